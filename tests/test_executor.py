"""The worker's executor in-process, on a real redis-server and the vLLM stand-in.

A job is begun as Celery's consumer receives its message (``workers.tasks``), before a pool
thread picks it up; the pool thread's ``run`` then waits for that run instead of starting
a second one. A delivery the transport left unrecorded is recorded by the job's start.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis

from api.schemas import JobCreate
from api.submission import build_record
from core import keys, redis_transport
from core.broker import RUN_JOB, task_message
from core.jobs import JobStatus, JobStore
from core.settings import Settings
from tests.cluster import wait_until
from tests.conftest import MakeExecutor
from tests.silencing_proxy import SilencingProxy
from tests.standins.openai_server import OpenAIConfig, OpenAIStandIn
from tests.standins.server_thread import ServerThread, free_port
from workers import executor as executor_module
from workers.executor import Executor


@pytest.fixture(scope="module")
def settings(redis_url: str) -> Iterator[Settings]:
    config = OpenAIConfig(step_base_s=0.001, step_per_seq_s=0, output_len="6")
    with ServerThread(OpenAIStandIn(config).app) as vllm:
        yield Settings(redis_url=redis_url, vllm_url=vllm.url, runtime_queues={"vllm": "gpu"})


def queued_job(settings: Settings, job_id: str, prompt: str = "echo: one two three") -> dict:
    """A job stored and queued as the API does; returns its record (the task's ``spec``)."""
    job = JobCreate(prompt=prompt, runtime="vllm")
    record = build_record(job, job_id, settings, "anonymous")

    async def create() -> None:
        client = aioredis.from_url(settings.redis_url)
        await JobStore(client, settings.result_ttl_s).create(record, task_message(record, False))
        await client.aclose()

    asyncio.run(create())
    return record


def test_begun_job_runs_without_its_pool_thread_and_only_once(
    settings: Settings, executor_for: MakeExecutor
) -> None:
    record = queued_job(settings, "job-begun")
    executor = executor_for(settings)
    executor.begin("job-begun", record, "delivery-1", redelivered=False)
    client = redis.Redis.from_url(settings.redis_url)
    wait_until(
        lambda: client.hget(keys.job("job-begun"), "status") == b"succeeded", 10, "begun job"
    )
    # A second run would find the job ended and report no attempts of its own.
    summary = executor.run("job-begun", record, "delivery-1", redelivered=False)
    assert summary == {"job_id": "job-begun", "status": "succeeded", "attempts": 1}
    assert client.hget(keys.job("job-begun"), "attempts") == b"1"


def test_job_not_begun_runs_in_its_pool_thread(
    settings: Settings, executor_for: MakeExecutor
) -> None:
    record = queued_job(settings, "job-plain")
    summary = executor_for(settings).run("job-plain", record, "delivery-2", redelivered=False)
    assert summary == {"job_id": "job-plain", "status": "succeeded", "attempts": 1}


def test_start_records_the_delivery_the_transport_deferred(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    executor_for: MakeExecutor,
) -> None:
    record = queued_job(settings, "job-recorded")
    monkeypatch.setattr(redis_transport.deferred, "tasks", frozenset({RUN_JOB}))
    raw = {"body": "...", "properties": {"delivery_tag": "delivery-r"}}
    message = SimpleNamespace(
        headers={"task": RUN_JOB}, delivery_info={"exchange": "", "routing_key": "gpu"}, _raw=raw
    )
    assert redis_transport.deferred.keep(message, "delivery-r")
    executor_for(settings).run("job-recorded", record, "delivery-r", redelivered=False)
    client = redis.Redis.from_url(settings.redis_url)
    assert json.loads(client.hget(keys.UNACKED, "delivery-r")) == [raw, "", "gpu"]
    started_at = float(client.hget(keys.job("job-recorded"), "started_at"))
    assert client.zscore(keys.UNACKED_INDEX, "delivery-r") == pytest.approx(started_at)
    assert redis_transport.deferred.take("delivery-r") is None


def test_finish_retried_after_a_lost_reply_still_counts(settings: Settings) -> None:
    """Redis may record a job's end and die before replying: the worker's retry must read
    as recorded (so the job's webhook is queued), and another run's end as superseded."""
    record = queued_job(settings, "job-finish-retry")

    async def scenario() -> tuple[bool, bool, bool]:
        client = aioredis.from_url(settings.redis_url)
        store = JobStore(client, settings.result_ttl_s)
        await store.start("job-finish-retry", "run-1", 3, record, redelivered=False)
        result = {"result": {"text": "done"}}
        first = await store.finish("job-finish-retry", "run-1", JobStatus.SUCCEEDED, result)
        retry = await store.finish("job-finish-retry", "run-1", JobStatus.SUCCEEDED, result)
        other = await store.finish("job-finish-retry", "run-2", JobStatus.FAILED, {})
        await client.aclose()
        return first, retry, other

    assert asyncio.run(scenario()) == (True, True, False)


def begun_and_running(executor: Executor, job_id: str, prompt: str, redis_url: str) -> redis.Redis:
    """Queue ``job_id`` and begin it on ``executor``; once it runs, a client of ``redis_url``
    (the server itself, whatever proxy the executor goes through) to watch it with."""
    record = queued_job(executor.settings, job_id, prompt)
    executor.begin(job_id, record, f"delivery-{job_id}", redelivered=False)
    client = redis.Redis.from_url(redis_url)
    wait_until(lambda: client.hget(keys.job(job_id), "status") == b"running", 10, "start")
    return client


LONG_PROMPT = "Reason step by step."  # not an echo: the stand-in answers output_len tokens
SHORT_PROMPT = "echo: " + " ".join(["word"] * 20)  # the stand-in echoes 20 tokens (2 s)


@pytest.fixture
def silenced(redis_url: str) -> Iterator[tuple[Settings, SilencingProxy]]:
    """Settings reaching Redis through a proxy that can silence its connections, and a
    vLLM stand-in slow enough (about 10 s a job) to silence them while a job runs."""
    proxy = SilencingProxy(redis_url).start()
    config = OpenAIConfig(step_base_s=0.1, step_per_seq_s=0, output_len="100")
    with ServerThread(OpenAIStandIn(config).app) as vllm:
        yield (
            Settings(
                redis_url=proxy.url,
                vllm_url=vllm.url,
                runtime_queues={"vllm": "gpu"},
                redis_timeout_s=0.5,
                control_poll_s=60.0,  # only the pub/sub nudge can cancel in time
            ),
            proxy,
        )


def test_job_outlives_its_redis_connections_dying_silently(
    redis_url: str,
    silenced: tuple[Settings, SilencingProxy],
    executor_for: MakeExecutor,
) -> None:
    settings, proxy = silenced
    client = begun_and_running(executor_for(settings), "job-silenced", SHORT_PROMPT, redis_url)
    proxy.partition()  # every connection the worker holds or opens goes silent
    time.sleep(3)  # the job ends meanwhile (2 s); recording its end hangs on a silent one
    assert client.hget(keys.job("job-silenced"), "status") == b"running"
    proxy.heal()  # for new connections only: the silent ones stay silent
    healed = time.time()
    # The end's write times out after redis_timeout_s and is retried on a new connection
    # (redis-py's own default timeout, 5 s, would take longer; older versions have none).
    wait_until(lambda: client.hget(keys.job("job-silenced"), "status") == b"succeeded", 10, "end")
    assert float(client.hget(keys.job("job-silenced"), "finished_at")) - healed < 2.5


def test_cancel_nudges_reach_a_worker_whose_pubsub_died_silently(
    redis_url: str,
    silenced: tuple[Settings, SilencingProxy],
    monkeypatch: pytest.MonkeyPatch,
    executor_for: MakeExecutor,
) -> None:
    monkeypatch.setattr(executor_module, "CONTROL_PING_S", 0.5)
    settings, proxy = silenced
    client = begun_and_running(executor_for(settings), "job-nudged", LONG_PROMPT, redis_url)
    proxy.silence()
    time.sleep(4)  # the listener pings, hears nothing, and subscribes on a new connection

    async def cancel() -> None:
        direct = aioredis.from_url(redis_url)
        await JobStore(direct, settings.result_ttl_s).cancel("job-nudged")
        await direct.aclose()

    asyncio.run(cancel())
    wait_until(lambda: client.hget(keys.job("job-nudged"), "status") == b"cancelled", 3, "cancel")


def test_job_outlives_a_failover_that_demotes_its_redis(
    redis_url: str,
    silenced: tuple[Settings, SilencingProxy],
    executor_for: MakeExecutor,
) -> None:
    # The server the worker holds connections to turns replica (of a primary that isn't up,
    # so it keeps its data) while a job runs: every write answers READONLY until it is
    # promoted again, as after a failover whose new primary the URL then names.
    settings, _ = silenced
    admin = begun_and_running(executor_for(settings), "job-demoted", SHORT_PROMPT, redis_url)
    admin.replicaof("127.0.0.1", free_port())
    try:
        time.sleep(3)  # the job ends meanwhile (2 s); its end is refused
        assert admin.hget(keys.job("job-demoted"), "status") == b"running"
    finally:
        admin.replicaof("NO", "ONE")
    promoted = time.time()
    wait_until(lambda: admin.hget(keys.job("job-demoted"), "status") == b"succeeded", 15, "end")
    assert float(admin.hget(keys.job("job-demoted"), "finished_at")) - promoted < 5


def test_reasoning_is_stored_and_streamed_apart_from_the_answer(
    redis_url: str, executor_for: MakeExecutor
) -> None:
    config = OpenAIConfig(step_base_s=0.001, step_per_seq_s=0, reasoning_tokens=2)
    events = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    events.subscribe(keys.job_events("job-reasoning"))
    with ServerThread(OpenAIStandIn(config).app) as vllm:
        settings = Settings(redis_url=redis_url, vllm_url=vllm.url, runtime_queues={"vllm": "gpu"})
        record = queued_job(settings, "job-reasoning", "echo: four")
        executor = executor_for(settings)
        executor._nudge({"watch": "job-reasoning"})  # as a server-sent events client does
        summary = executor.run("job-reasoning", record, None, redelivered=False)
    assert summary["status"] == "succeeded"
    published, quiet_from = [], time.monotonic()
    while time.monotonic() - quiet_from < 0.5:  # None also for the subscribe confirmation
        if message := events.get_message(timeout=0.1):
            published.append(json.loads(message["data"]))
            quiet_from = time.monotonic()
    streamed = [(e["type"], e["text"]) for e in published if e["type"] != "status"]
    assert streamed == [("reasoning", " step1 step2"), ("token", " four")], published
    stored = redis.Redis.from_url(redis_url).hget(keys.job("job-reasoning"), "result")
    result = json.loads(stored)
    assert (result["reasoning"], result["text"]) == (" step1 step2", " four")
    assert result["usage"]["completion_tokens"] == 3
