"""A counting semaphore in Redis, shared by every worker that talks to one backend.

Holders are members of a sorted set scored by their last renewal; a holder whose worker
died stops being renewed and its slot is reclaimed after ``lease_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import redis.exceptions

from core import keys

# ARGV: now, lease_s, limit, token. Returns 1 when the slot was taken.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[2])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
  return 1
end
return 0
"""


class BackendSemaphore:
    def __init__(self, redis: aioredis.Redis, limit: int, lease_s: float = 60.0) -> None:
        self.redis = redis
        self.limit = limit
        self.lease_s = lease_s
        self.held: dict[str, str] = {}  # token -> key, renewed by the worker's control loop
        self._acquire = redis.register_script(_ACQUIRE)
        self._releasing: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def slot(
        self, backend: str, acquiring: asyncio.Future[str] | None = None
    ) -> AsyncIterator[None]:
        """Hold a slot of ``backend`` for the block; ``acquiring``: an ``acquire`` started
        ahead, to use instead of a new one."""
        token = await (acquiring if acquiring is not None else self.acquire(backend))
        try:
            yield
        finally:
            self.release(token)

    def forgo(self, acquiring: asyncio.Future[str]) -> None:
        """An ``acquire`` started ahead that no ``slot`` will use: its slot, once it has
        one, is given back."""
        acquiring.add_done_callback(
            lambda done: done.cancelled() or done.exception() or self.release(done.result())
        )

    async def acquire(self, backend: str) -> str:
        """Wait for a slot of ``backend``; returns its token, for ``release``."""
        key, token = keys.inflight(backend), uuid.uuid4().hex
        delay = 0.005
        while True:
            try:
                args = [time.time(), self.lease_s, self.limit, token]
                if await self._acquire(keys=[key], args=args):
                    break
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass  # Redis restarting: wait for it as for a full backend (job deadline)
            # Back off while the backend is full, so waiters don't hammer Redis.
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.25)
        self.held[token] = key
        return token

    def release(self, token: str) -> None:
        """Give a held slot back, in the background: the job's end (its result, the client
        waiting for it) goes out meanwhile instead of one round trip later."""
        release = asyncio.ensure_future(self._release(self.held.pop(token), token))
        self._releasing.add(release)
        release.add_done_callback(self._releasing.discard)

    async def _release(self, key: str, token: str) -> None:
        # Redis unreachable: the slot's lease runs out instead.
        with contextlib.suppress(redis.exceptions.RedisError):
            await self.redis.zrem(key, token)

    def renew(self, pipe: aioredis.client.Pipeline, now: float) -> None:
        """Queue lease renewals for every held slot on ``pipe``."""
        for token, key in self.held.items():
            pipe.zadd(key, {token: now}, xx=True)
