"""Server-sent events: a job's status changes, its tokens as they are generated, its result;
a batch's progress.

``GET /v1/jobs/{id}/events`` answers ``text/event-stream``::

    event: status          data: {"status": "running"}
    event: reasoning       data: {"text": "Speed is distance"}   (reasoning models only)
    event: token           data: {"text": "The train"}
    event: result          data: <the job, as GET /v1/jobs/{id} shows it>

then ends. The first event is always the job's current status, and a job that already ended
gets its result at once. A comment line (``: keep-alive``) goes out on an idle stream every
``REASONQ_SSE_KEEPALIVE_S``. Browsers' ``EventSource`` reconnects when a stream ends: close
it on ``result``.

``GET /v1/batches/{id}/events`` sends ``progress`` (the batch's status and counts) on
connecting and as its jobs end, at most every ``PROGRESS_EVERY_S``, then ``result`` (the
batch, as ``GET /v1/batches/{id}`` shows it) once it finished, and ends.

Each connection subscribes the job's channel first, then joins the job's watchers set
(workers publish tokens only while it exists, and flush what they buffered when it
appears), and only then reads the job: no status change or token falls in between.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.deps import BatchesDep, HubDep, OwnerDep, RedisDep, SettingsDep, StoreDep
from api.events import EventHub
from api.routes.batches import NOT_FOUND as BATCH_NOT_FOUND
from api.routes.batches import batch_public, read_batch
from api.routes.jobs import NOT_FOUND, base_url, job_public, read_job
from core import keys
from core.batches import BatchStore
from core.jobs import TERMINAL, JobStore

router = APIRouter(tags=["events"])

KEEPALIVE = b": keep-alive\n\n"

# Thousands of a batch's jobs may end each second: one progress event covers them all.
PROGRESS_EVERY_S = 0.25

_STREAM = {200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"}}


def sse(event: str, data: Any) -> bytes:
    """One server-sent event; ``data`` as one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EventStream(Response):
    """A ``text/event-stream`` response that stops its generator when the client leaves.

    Starlette's ``StreamingResponse`` stops it through an anyio cancel scope, inside which
    the generator's clean-up (leaving the watchers set, unsubscribing) could not await;
    here the generator gets one plain asyncio cancellation and its ``finally`` runs.
    """

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        # Not Response.__init__: that would announce "content-length: 0".
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # nginx: pass events on as they come
        ]
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        gone = asyncio.ensure_future(_disconnected(receive))
        await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in (pump, gone):
            task.cancel()
        await asyncio.gather(pump, gone, return_exceptions=True)
        if not pump.cancelled() and pump.exception() is not None:
            raise pump.exception()  # type: ignore[misc]

    async def _pump(self, send: Send) -> None:
        async with aclosing(self.events) as events:  # type: ignore[type-var]
            async for chunk in events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Watch:
    """This connection's membership of a job's watchers set, kept alive while it lasts.

    A set of connection ids rather than a counter: a connection leaves only itself, and one
    whose API process died drops out when the TTL it stopped refreshing runs out.
    """

    def __init__(self, redis: aioredis.Redis, job_id: str, refresh_s: float) -> None:
        self.redis, self.job_id = redis, job_id
        self.key, self.member = keys.job_watchers(job_id), uuid.uuid4().hex
        self.refresh_s = refresh_s
        self.ttl_s = max(1, round(4 * refresh_s))
        self._refreshed = 0.0

    async def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._refreshed < self.refresh_s:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self.key, self.member).expire(self.key, self.ttl_s)
            if force:  # joining: tell the worker now, not at its next poll
                pipe.publish(keys.CONTROL, json.dumps({"watch": self.job_id}))
            await pipe.execute()
        self._refreshed = time.monotonic()

    async def leave(self) -> None:
        await self.redis.srem(self.key, self.member)


@asynccontextmanager
async def watching(redis: aioredis.Redis, job_id: str, refresh_s: float) -> AsyncIterator[Watch]:
    """Join the job's watchers for the duration of the block."""
    watch = Watch(redis, job_id, refresh_s)
    await watch.refresh(force=True)
    try:
        yield watch
    finally:
        await watch.leave()


async def next_event(events: asyncio.Queue[dict[str, Any]], wait_s: float) -> dict | None:
    """The next event, or ``None`` after ``wait_s`` without one."""
    try:
        async with asyncio.timeout(wait_s):
            return await events.get()
    except TimeoutError:
        return None


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=Response,  # not JSON; the 200 is described by _STREAM
    responses=NOT_FOUND | _STREAM,
)
async def job_events(
    job_id: str,
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    redis: RedisDep,
    hub: HubDep,
    owner: OwnerDep,
) -> EventStream:
    """Follow a job as server-sent events: ``status`` changes, ``token`` text as the model
    writes it (streaming runtimes), then ``result`` (the whole job) and the end."""
    await read_job(store, job_id, owner)  # an unknown job is a plain 404, not a stream
    url = base_url(request, settings.public_url)
    return EventStream(
        job_stream(store, redis, hub, job_id, owner, url, settings.sse_keepalive_s)
    )


async def job_stream(
    store: JobStore,
    redis: aioredis.Redis,
    hub: EventHub,
    job_id: str,
    owner: str,
    url: str,
    keepalive_s: float,
) -> AsyncIterator[bytes]:
    """The events of one job's stream, ending after its ``result``."""
    async with (
        hub.listen(keys.job_events(job_id)) as events,
        watching(redis, job_id, keepalive_s) as watch,
    ):
        record = await read_job(store, job_id, owner)
        shown = None
        while True:
            if record["status"] != shown:
                shown = record["status"]
                yield sse("status", {"status": shown})
            if shown in TERMINAL:
                yield sse("result", job_public(record, url).model_dump(mode="json"))
                return
            event = await next_event(events, keepalive_s)
            await watch.refresh()
            if event is None:
                yield KEEPALIVE
                # Re-read while idle: an end whose event was lost (Redis reconnect) still
                # ends the stream.
                record = await read_job(store, job_id, owner)
            elif event.get("type") in ("token", "reasoning"):
                yield sse(event["type"], {"text": event["text"]})
            elif event.get("type") == "status" and event["status"] in TERMINAL:
                # Tokens are published before the final status, so none is left behind.
                record = event.get("record") or await read_job(store, job_id, owner)
            elif event.get("type") == "status":
                record = {**record, "status": event["status"]}


@router.get(
    "/v1/batches/{batch_id}/events",
    response_class=Response,
    responses=BATCH_NOT_FOUND | _STREAM,
)
async def batch_events(
    batch_id: str,
    request: Request,
    settings: SettingsDep,
    batches: BatchesDep,
    hub: HubDep,
    owner: OwnerDep,
) -> EventStream:
    """Follow a batch as server-sent events: ``progress`` (status and counts) as its jobs
    end, then ``result`` (the whole batch) once it finished, and the end."""
    await read_batch(batches, batch_id, owner)
    url = base_url(request, settings.public_url)
    return EventStream(batch_stream(batches, hub, batch_id, owner, url, settings.sse_keepalive_s))


async def batch_stream(
    batches: BatchStore, hub: EventHub, batch_id: str, owner: str, url: str, keepalive_s: float
) -> AsyncIterator[bytes]:
    """The events of one batch's stream, ending after its ``result``."""
    async with hub.listen(keys.batch_events(batch_id)) as events:
        record = await read_batch(batches, batch_id, owner)
        shown = None
        while "finished_at" not in record:
            batch = batch_public(record, url)
            progress = {"status": batch.status, "counts": batch.counts.model_dump()}
            if progress != shown:
                shown = progress
                yield sse("progress", progress)
            event = await next_event(events, keepalive_s)
            if event is None:
                yield KEEPALIVE
            elif not event.get("finished"):
                await asyncio.sleep(PROGRESS_EVERY_S)
                while not events.empty():  # covered by the read below
                    events.get_nowait()
            record = await read_batch(batches, batch_id, owner)
        yield sse("result", batch_public(record, url).model_dump(mode="json"))


__all__ = ["EventStream", "batch_stream", "job_stream", "next_event", "router", "sse"]
