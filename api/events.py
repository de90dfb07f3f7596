"""Fan-out of job events: one Redis pub/sub connection per API process, many listeners.

A request that waits on a job (long-poll, server-sent events) subscribes here; the hub
subscribes the Redis channel once, however many clients watch the same job, and drops it
when the last one leaves.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("reasonq.api")

# The hub keeps this channel subscribed so its reader always has a connection to read.
_IDLE_CHANNEL = "reasonq:hub"


class EventHub:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._pubsub = redis.pubsub()
        self._listeners: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        # Resolved when Redis confirms a SUBSCRIBE: only then is no publish missed.
        self._subscribed: dict[str, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._unsubscribing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._pubsub.subscribe(_IDLE_CHANNEL)
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._reader:
            self._reader.cancel()
            with suppress(asyncio.CancelledError):
                await self._reader
        await self._pubsub.aclose()

    @asynccontextmanager
    async def listen(self, channel: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """Events of ``channel`` as they arrive. Subscribed before this yields, so reading
        the job's state after entering never misses a change."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        listeners = self._listeners.setdefault(channel, set())
        listeners.add(queue)
        try:
            if len(listeners) == 1:
                self._subscribed[channel] = asyncio.get_running_loop().create_future()
                await self._pubsub.subscribe(channel)
            # SUBSCRIBE travels on the pub/sub connection, a later read on another one:
            # without this wait the read could overtake it and miss the event it waits for.
            await asyncio.wait_for(asyncio.shield(self._subscribed[channel]), 5.0)
            yield queue
        finally:
            listeners.discard(queue)
            if not listeners:
                del self._listeners[channel]
                self._subscribed.pop(channel, None)
                # After the answer goes out, not before: the waiter's response is what
                # the client is waiting for.
                task = asyncio.create_task(self._unsubscribe(channel))
                self._unsubscribing.add(task)
                task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, channel: str) -> None:
        if channel in self._listeners:
            return  # a new listener came meanwhile and has (re)subscribed it
        with suppress(RedisError):
            await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except RedisError:
                log.warning("event hub lost Redis; resubscribing")
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            channel = message["channel"].decode()
            if message["type"] == "subscribe":
                confirmed = self._subscribed.get(channel)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
                continue
            if message["type"] != "message":
                continue
            event = json.loads(message["data"])
            for queue in self._listeners.get(channel, ()):
                queue.put_nowait(event)
