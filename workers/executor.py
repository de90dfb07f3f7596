"""Runs jobs for one worker process on a single asyncio loop.

Celery's consumer starts each job on the shared loop as it receives the message
(``Executor.begin``); the job's pool thread, handed the job once its backend request is
out (``workers.pool``), parks in ``Executor.run`` until it ends. Every generation of the
process shares that loop, one client per runtime and one Redis connection pool, so a
process keeps ``REASONQ_WORKER_CONCURRENCY`` generations in flight for the CPU cost of a
single thread.

Cancel requests and new event-stream watchers arrive at once over pub/sub
(``keys.CONTROL``). A control loop publishes the buffered tokens of watched jobs (tokens
are published only while someone watches) and, every ``REASONQ_CONTROL_POLL_S``, polls the
durable cancel and watcher flags of all running jobs in one Redis round trip (the safety
net for a lost nudge) and renews their broker leases and semaphore slots.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
import uvloop
from redis.exceptions import RedisError

from core import keys, redis_transport
from core.connections import redis_client
from core.errors import REDIS_UNAVAILABLE, BackendRejected, BackendUnavailable
from core.jobs import JobStatus, JobStore
from core.settings import Settings
from runtimes.base import Completion, GenerationRequest, Runtime
from runtimes.registry import create_runtime
from workers import metrics
from workers.orphans import OrphanSweeper
from workers.semaphore import BackendSemaphore
from workers.webhooks import WebhookSender

log = logging.getLogger("reasonq.worker")

T = TypeVar("T")


# A runtime stops at its next token; one stuck waiting on its backend is cut off after this.
CANCEL_GRACE_S = 1.0

# Redis unavailable: a job's start and end are retried this long, then the delivery is
# handed back to the broker (workers.tasks).
REDIS_OUTAGE_S = 60.0
# A watch nudge for a job not (yet) running here is remembered this long.
WATCH_HINT_S = 10.0
# The control channel silent this long is pinged; a ping unanswered as long again means the
# connection died without a word (half-open TCP): subscribe again on a new one.
CONTROL_PING_S = 10.0


@dataclass
class RunningJob:
    job_id: str
    delivery_tag: str | None
    # Resolved once the backend request is out or the job has ended (workers.pool).
    under_way: concurrent.futures.Future[None] | None = None
    # The broker's record of this delivery, for the start script to write
    # (core.redis_transport); None when the transport wrote it.
    unacked_entry: str | None = None
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    watched: bool = False
    # Appended from any thread (the ONNX engine calls back from its own); list.append is atomic.
    tokens: list[str] = field(default_factory=list)
    published: int = 0  # tokens[:published] went out as events
    thoughts: list[str] = field(default_factory=list)  # a reasoning model's, apart
    published_thoughts: int = 0

    @property
    def cancelled(self) -> bool:
        return self.cancel_requested.is_set()

    def mark_under_way(self) -> None:
        if self.under_way is not None and not self.under_way.done():
            self.under_way.set_result(None)


@dataclass
class BegunJob:
    """A job ``Executor.begin`` started: its run, and when it is under way."""

    run: concurrent.futures.Future[dict[str, Any]]
    under_way: concurrent.futures.Future[None]


class Executor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: dict[str, RunningJob] = {}
        self._runtimes: dict[str, Runtime] = {}
        self._runtime_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Lock()
        self._last_lease_renewal = 0.0
        self._watch_hints: dict[str, float] = {}  # job id -> when a watcher announced itself
        self._begun: dict[str, BegunJob] = {}  # by delivery tag

    # --- the loop thread ------------------------------------------------------------
    def start(self) -> asyncio.AbstractEventLoop:
        """Start the loop thread (idempotent). Cheap: runtimes and models load on first use,
        since a pool child whose start-up takes more than a few seconds is killed."""
        with self._started:
            if self._loop is None:
                ready = threading.Event()
                threading.Thread(
                    target=self._serve, args=(ready,), name="reasonq-loop", daemon=True
                ).start()
                ready.wait()
        assert self._loop is not None
        return self._loop

    def _serve(self, ready: threading.Event) -> None:
        loop = uvloop.new_event_loop()  # a little less CPU per job (docs/performance.md)
        asyncio.set_event_loop(loop)
        self.redis = redis_client(
            self.settings, max_connections=self.settings.worker_concurrency + 16
        )
        self.store = JobStore(self.redis, self.settings.result_ttl_s)
        self.semaphore = BackendSemaphore(self.redis, self.settings.backend_max_inflight)
        self._loop = loop
        loop.create_task(self._control_loop())
        loop.create_task(self._control_listener())
        self.webhooks = WebhookSender(self.redis, self.settings)
        loop.create_task(self.webhooks.run_forever())
        self._orphans = loop.create_task(OrphanSweeper(self.redis, self.settings).run_forever())
        ready.set()
        loop.run_forever()

    def warm_up(self, queues: list[str]) -> None:
        """Load, in the background, the runtimes this worker's queues serve, so its first
        job doesn't pay for loading a model; start-up itself stays fast."""
        names = [name for name, queue in self.settings.runtime_queues.items() if queue in queues]
        asyncio.run_coroutine_threadsafe(self._warm_up(names), self.start())

    async def _warm_up(self, names: list[str]) -> None:
        for name in names:
            try:
                await (await self._runtime(name)).warm_up()
            except Exception:  # e.g. no model yet: its jobs will fail with the reason
                log.exception("warming up runtime %s failed", name)

    def begin(
        self, job_id: str, spec: dict[str, Any], delivery_tag: str, redelivered: bool
    ) -> None:
        """Start a delivered job on the loop now; its pool thread's ``run`` waits for it.
        Called from Celery's consumer as it hands the message to the pool, so waking a pool
        thread is not on the job's path (docs/performance.md)."""
        under_way: concurrent.futures.Future[None] = concurrent.futures.Future()
        run = self._submit(job_id, spec, delivery_tag, redelivered, under_way)
        self._begun[delivery_tag] = BegunJob(run, under_way)

    def under_way(self, delivery_tag: str | None) -> concurrent.futures.Future[None] | None:
        """For a job ``begin`` started: resolved once its backend request is out or it has
        ended (it may never reach the backend). None for any other delivery."""
        begun = self._begun.get(delivery_tag) if delivery_tag else None
        return begun.under_way if begun else None

    def run(
        self, job_id: str, spec: dict[str, Any], delivery_tag: str | None, redelivered: bool
    ) -> dict[str, Any]:
        """Run one job to its end, or wait for the one ``begin`` started; called from a
        Celery pool thread. Returns a summary."""
        begun = self._begun.pop(delivery_tag, None) if delivery_tag else None
        run = begun.run if begun else self._submit(job_id, spec, delivery_tag, redelivered)
        return run.result()

    def _submit(
        self,
        job_id: str,
        spec: dict[str, Any],
        delivery_tag: str | None,
        redelivered: bool,
        under_way: concurrent.futures.Future[None] | None = None,
    ) -> concurrent.futures.Future[dict[str, Any]]:
        entry = redis_transport.deferred.take(delivery_tag)
        job = RunningJob(job_id, delivery_tag, under_way, entry)
        return asyncio.run_coroutine_threadsafe(self._run(job, spec, redelivered), self.start())

    def revoke(self, job_id: str) -> None:
        """Celery revoked the job's task (Flower's Revoke or Terminate, ``celery control
        revoke``): cancel the job as ``DELETE /v1/jobs/{id}`` does. Celery drops a revoked
        message unrun, which alone would leave its job ``queued`` for good."""
        asyncio.run_coroutine_threadsafe(self._revoke(job_id), self.start())

    async def _revoke(self, job_id: str) -> None:
        if job := self.running.get(job_id):
            job.cancel_requested.set()  # it ends ``cancelled`` and queues its webhook itself
        status = await _until_redis_answers(
            lambda: self.store.cancel(job_id), f"job {job_id}: revoke"
        )
        log.info("job %s revoked in Celery: %s", job_id, status or "unknown job")
        if status == JobStatus.CANCELLED:
            await self.webhooks.queue_job_delivery(job_id)

    # --- one job --------------------------------------------------------------------
    async def _run(
        self, job: RunningJob, spec: dict[str, Any], redelivered: bool
    ) -> dict[str, Any]:
        # Listed from delivery to recorded end, so the control loop renews the delivery's
        # lease even while a step waits out a Redis outage: no other worker is handed it.
        job.watched = self._watch_hints.pop(job.job_id, None) is not None
        self.running[job.job_id] = job
        try:
            return await self._run_listed(job, spec, redelivered)
        finally:
            del self.running[job.job_id]
            job.mark_under_way()

    async def _run_listed(
        self, job: RunningJob, spec: dict[str, Any], redelivered: bool
    ) -> dict[str, Any]:
        job_id, run_id = job.job_id, uuid.uuid4().hex
        runtime_name = spec["runtime"]
        request = GenerationRequest(**spec["request"])
        # Ask for a backend slot while the start is recorded: the two round trips overlap.
        slot = asyncio.ensure_future(self.semaphore.acquire(runtime_name))
        delivery = (job.delivery_tag, job.unacked_entry) if job.unacked_entry else None
        try:
            outcome, attempts = await _until_redis_answers(
                lambda: self.store.start(
                    job_id, run_id, self.settings.max_attempts, spec, redelivered, delivery
                ),
                f"job {job_id}: start",
            )
        except BaseException:
            self.semaphore.forgo(slot)
            raise
        if outcome != JobStatus.RUNNING:
            self.semaphore.forgo(slot)
            log.info("job %s not run: %s", job_id, outcome)
            # Already ended (poison, cancelled while queued, or a redelivery after a crash
            # right after finishing): make sure its webhook was queued.
            await self.webhooks.job_ended(job_id, spec)
            return {"job_id": job_id, "status": outcome}
        started = time.time()
        metrics.QUEUE_WAIT.labels(runtime_name).observe(max(0.0, started - spec["created_at"]))
        status, fields = JobStatus.FAILED, {}
        try:
            # In this task (not wait_for's): no extra hop between the end and finish.
            async with asyncio.timeout(self.settings.job_deadline_s):
                completion, backend_s = await self._generate(runtime_name, request, job, slot)
            status = (
                JobStatus.CANCELLED
                if completion.finish_reason == "cancelled"
                else JobStatus.SUCCEEDED
            )
            fields = {"result": _result(completion, runtime_name, backend_s, spec, started)}
            metrics.observe_completion(runtime_name, completion, time.time() - started)
        except BackendRejected as exc:
            fields = {"error": _error(exc.code, str(exc), retryable=False)}
        except BackendUnavailable as exc:
            fields = {"error": _error(exc.code, f"{exc} (gave up after retries)", True)}
        except TimeoutError:
            fields = {
                "error": _error(
                    "deadline_exceeded",
                    f"still running after {self.settings.job_deadline_s:g} s; stopped",
                    retryable=True,
                )
            }
        except Exception as exc:  # a worker never dies of one job
            log.exception("job %s crashed", job_id)
            fields = {"error": _error("internal_error", f"{type(exc).__name__}: {exc}", False)}
        with contextlib.suppress(RedisError):  # tokens are best effort; the result is not
            await self._flush_tokens(job)
        finished = await _until_redis_answers(
            lambda: self.store.finish(job_id, run_id, status, fields), f"job {job_id}: finish"
        )
        if finished:
            metrics.JOBS.labels(status=status.value, runtime=runtime_name).inc()
            await self.webhooks.job_ended(job_id, spec)
        return {"job_id": job_id, "status": status.value, "attempts": attempts}

    async def _generate(
        self,
        runtime_name: str,
        request: GenerationRequest,
        job: RunningJob,
        first_slot: asyncio.Future[str],
    ) -> tuple[Completion, float]:
        """One generation, retried with exponential backoff and jitter on backend outages;
        ``first_slot``: the first attempt's backend slot, already being acquired.

        The semaphore slot is released while waiting, so a down backend holds no capacity.
        """
        acquiring: asyncio.Future[str] | None = first_slot
        try:
            runtime = await self._runtime(runtime_name)
            s = self.settings
            for attempt in range(1, s.retry_max_attempts + 1):
                try:
                    async with self.semaphore.slot(runtime_name, acquiring):
                        acquiring = None
                        # Once this step has sent the request, not while it does.
                        asyncio.get_running_loop().call_soon(job.mark_under_way)
                        began = time.perf_counter()
                        completion = await self._cancellable(runtime, request, job)
                        return completion, time.perf_counter() - began
                except BackendUnavailable as exc:
                    metrics.BACKEND_ERRORS.labels(runtime=runtime_name, code=exc.code).inc()
                    if attempt == s.retry_max_attempts:
                        raise
                    delay = min(s.retry_backoff_max_s, s.retry_backoff_s * 2 ** (attempt - 1))
                    delay *= random.uniform(0.5, 1.0)
                    delay = max(delay, exc.retry_after or 0.0)
                    log.warning("job %s: %s; retry %d in %.2f s", job.job_id, exc, attempt, delay)
                    metrics.RETRIES.labels(runtime=runtime_name).inc()
                    deadline = time.monotonic() + delay
                    while time.monotonic() < deadline and not job.cancelled:
                        await asyncio.sleep(min(0.05, delay))
                    if job.cancelled:
                        return Completion("", "cancelled", 0, 0, request.model or ""), 0.0
            raise AssertionError("unreachable")
        finally:
            if acquiring is not None:  # failed before its first attempt took the slot
                self.semaphore.forgo(acquiring)

    async def _cancellable(
        self, runtime: Runtime, request: GenerationRequest, job: RunningJob
    ) -> Completion:
        """The generation, run in this task (no hop between its end and the job's). Once
        cancelled, a runtime stops at its next token; one stuck waiting on its backend is
        cut off ``CANCEL_GRACE_S`` later, as ``asyncio.timeout`` would."""
        task = asyncio.current_task()
        assert task is not None
        cut_off = False

        async def watch() -> None:
            nonlocal cut_off
            await job.cancel_requested.wait()
            await asyncio.sleep(CANCEL_GRACE_S)
            cut_off = True
            task.cancel()  # closes the backend stream, so it stops generating

        watcher = asyncio.ensure_future(watch())
        try:
            return await runtime.generate(
                request, job.tokens.append, lambda: job.cancelled, on_reasoning=job.thoughts.append
            )
        except asyncio.CancelledError:
            if cut_off and task.uncancel() == 0:
                text = "".join(job.tokens)
                return Completion(text, "cancelled", 0, len(job.tokens), request.model or "")
            raise  # the job's deadline, or the worker stopping
        finally:
            watcher.cancel()

    async def _runtime(self, name: str) -> Runtime:
        if name not in self._runtimes:
            async with self._runtime_lock:
                if name not in self._runtimes:
                    self._runtimes[name] = create_runtime(name, self.settings)
        return self._runtimes[name]

    # --- control loop ---------------------------------------------------------------
    async def _control_loop(self) -> None:
        last_poll = 0.0
        while True:
            await asyncio.sleep(self.settings.control_interval_s)
            if not self.running:
                continue
            try:
                if time.monotonic() - last_poll >= self.settings.control_poll_s:
                    last_poll = time.monotonic()
                    await self._control_once()
                else:
                    await self._flush_watched()
            except REDIS_UNAVAILABLE as exc:  # one line, not a traceback per tick
                log.warning("control loop: Redis unavailable (%s)", exc)
                await asyncio.sleep(0.5)
            except Exception:  # Redis blips must not kill the loop
                log.exception("control loop")

    async def _control_listener(self) -> None:
        """Cancel and watch nudges from the API, so neither waits for the next poll."""
        # A client of its own: subscribing again after a silent connection must not pick a
        # connection of the shared pool, which may have died the same way.
        client = redis_client(self.settings, max_connections=1)
        while True:
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(keys.CONTROL)
                    await self._listen(pubsub)
            except REDIS_UNAVAILABLE:
                await asyncio.sleep(0.5)  # resubscribes once Redis is back
            except Exception:
                log.exception("control listener")
                await asyncio.sleep(0.5)

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        heard, pinged = time.monotonic(), False
        while True:
            message = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is not None:
                heard, pinged = now, False
                if message["type"] == "message":
                    self._nudge(json.loads(message["data"]))
            elif now - heard > CONTROL_PING_S:
                if pinged:
                    raise redis.exceptions.TimeoutError("control channel: ping unanswered")
                await pubsub.ping()
                heard, pinged = now, True

    def _nudge(self, message: dict[str, str]) -> None:
        if job_id := message.get("cancel"):
            if job := self.running.get(job_id):
                job.cancel_requested.set()
        elif job_id := message.get("watch"):
            if job := self.running.get(job_id):
                job.watched = True
            else:  # the job may start here in a moment
                self._watch_hints[job_id] = time.monotonic()

    async def _control_once(self) -> None:
        jobs = list(self.running.values())
        async with self.redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.hget(keys.job(job.job_id), "cancel_requested")
                pipe.exists(keys.job_watchers(job.job_id))
            now = time.time()
            renew = now - self._last_lease_renewal > self.settings.visibility_timeout_s / 4
            if renew:
                tags = {job.delivery_tag: now for job in jobs if job.delivery_tag}
                if tags:
                    pipe.zadd(keys.UNACKED_INDEX, tags, xx=True)
                self.semaphore.renew(pipe, now)
            replies = await pipe.execute()
        if renew:  # only once it went through: after a Redis outage, renew at once
            self._last_lease_renewal = now
        for i, job in enumerate(jobs):
            if replies[2 * i] is not None:
                job.cancel_requested.set()
            job.watched = bool(replies[2 * i + 1])
        stale = time.monotonic() - WATCH_HINT_S
        self._watch_hints = {j: t for j, t in self._watch_hints.items() if t > stale}
        await self._flush_watched()

    async def _flush_watched(self) -> None:
        jobs = [job for job in self.running.values() if job.watched]
        await asyncio.gather(*(self._flush_tokens(job) for job in jobs))

    async def _flush_tokens(self, job: RunningJob) -> None:
        """Publish what the watched job generated since the last flush: its thinking first
        (a reasoning model thinks before it answers), then its answer."""
        if not job.watched:
            return
        thoughts, tokens = len(job.thoughts), len(job.tokens)
        pending = {
            "reasoning": job.thoughts[job.published_thoughts : thoughts],
            "token": job.tokens[job.published : tokens],
        }
        job.published_thoughts, job.published = thoughts, tokens
        for kind, pieces in pending.items():
            if pieces:
                event = json.dumps({"type": kind, "text": "".join(pieces)})
                await self.redis.publish(keys.job_events(job.job_id), event)


async def _until_redis_answers(call: Callable[[], Awaitable[T]], what: str) -> T:
    """``call()``, retried while Redis is unreachable, for up to ``REDIS_OUTAGE_S``."""
    deadline = time.monotonic() + REDIS_OUTAGE_S
    delay = 0.1
    while True:
        try:
            return await call()
        except REDIS_UNAVAILABLE as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: Redis unavailable (%s); retry in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def _error(code: str, message: str, retryable: bool) -> dict[str, Any]:
    return {"code": code, "message": message, "retryable": retryable}


def _result(
    completion: Completion, runtime: str, backend_s: float, spec: dict, started: float
) -> dict[str, Any]:
    run_s = time.time() - started
    return {
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "tool_calls": completion.tool_calls,
        "reasoning": completion.reasoning,
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
        },
        "runtime": runtime,
        "model": completion.model,
        "worker": metrics.HOSTNAME,
        "timings": {
            "queue_wait_s": round(max(0.0, started - spec["created_at"]), 6),
            "time_to_first_token_s": completion.time_to_first_token_s,
            "run_s": round(run_s, 6),
            "backend_s": round(backend_s, 6),
            "tokens_per_s": round(completion.completion_tokens / backend_s, 3)
            if backend_s > 0
            else None,
        },
    }
