"""``BackendSemaphore`` on a real redis-server: the limit, background release, and slots
acquired ahead that end up unused (``forgo``)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from core import keys
from workers.semaphore import BackendSemaphore

pytestmark = pytest.mark.anyio


async def held_in_redis(client: aioredis.Redis, backend: str) -> int:
    return await client.zcard(keys.inflight(backend))


async def eventually_free(client: aioredis.Redis, backend: str) -> None:
    for _ in range(100):
        if await held_in_redis(client, backend) == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the slot was never given back")


async def test_limit_holds_and_release_frees_the_slot(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    semaphore = BackendSemaphore(client, limit=1)
    async with semaphore.slot("limit"):
        second = asyncio.ensure_future(semaphore.acquire("limit"))
        await asyncio.sleep(0.1)
        assert not second.done()  # the backend is full
        assert await held_in_redis(client, "limit") == 1
    token = await asyncio.wait_for(second, 2)  # given back in the background, then taken
    assert semaphore.held == {token: keys.inflight("limit")}
    semaphore.release(token)
    await eventually_free(client, "limit")
    await client.aclose()


async def test_a_slot_acquired_ahead_and_unused_is_given_back(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    semaphore = BackendSemaphore(client, limit=1)
    ahead = asyncio.ensure_future(semaphore.acquire("ahead"))
    semaphore.forgo(ahead)  # e.g. the job turned out to be cancelled while queued
    await asyncio.wait_for(ahead, 2)
    await eventually_free(client, "ahead")
    assert semaphore.held == {}
    # Used by a slot instead, it is held for the block and released after it.
    ahead = asyncio.ensure_future(semaphore.acquire("ahead"))
    async with semaphore.slot("ahead", ahead):
        assert await held_in_redis(client, "ahead") == 1
    await eventually_free(client, "ahead")
    await client.aclose()


async def test_a_cancelled_acquire_holds_nothing(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    semaphore = BackendSemaphore(client, limit=1)
    async with semaphore.slot("busy"):
        waiting = asyncio.ensure_future(semaphore.acquire("busy"))
        semaphore.forgo(waiting)
        await asyncio.sleep(0.05)
        waiting.cancel()  # the job's deadline, while the backend was full
    await eventually_free(client, "busy")
    assert semaphore.held == {}
    await client.aclose()
