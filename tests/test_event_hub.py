"""``EventHub`` on a real redis-server: a channel is subscribed while someone listens and
dropped after the last listener leaves, even when a new listener comes at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from api.events import EventHub

pytestmark = pytest.mark.anyio

CHANNEL = "reasonq:job:hub-test:events"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def hub(client: aioredis.Redis) -> AsyncIterator[EventHub]:
    hub = EventHub(client)
    await hub.start()
    yield hub
    await hub.stop()


async def subscribers(client: aioredis.Redis) -> int:
    return dict(await client.pubsub_numsub(CHANNEL))[CHANNEL.encode()]


async def eventually_subscribers(client: aioredis.Redis, expected: int) -> None:
    for _ in range(100):
        if await subscribers(client) == expected:
            return
        await asyncio.sleep(0.01)
    assert await subscribers(client) == expected


async def test_listener_gets_events_and_leaving_unsubscribes(
    hub: EventHub, client: aioredis.Redis
) -> None:
    async with hub.listen(CHANNEL) as events:
        assert await subscribers(client) == 1
        await client.publish(CHANNEL, '{"type": "status", "status": "running"}')
        assert await asyncio.wait_for(events.get(), 5) == {"type": "status", "status": "running"}
    await eventually_subscribers(client, 0)


async def test_new_listener_right_after_the_last_left_keeps_the_channel(
    hub: EventHub, client: aioredis.Redis
) -> None:
    # The unsubscribe is sent after the leaving listener's answer: a listener entering
    # before that must not lose the subscription it relies on.
    async with hub.listen(CHANNEL):
        pass
    async with hub.listen(CHANNEL) as events:
        await asyncio.sleep(0.1)  # the first listener's unsubscribe has run by now
        assert await subscribers(client) == 1
        await client.publish(CHANNEL, '{"type": "token", "text": "x"}')
        assert await asyncio.wait_for(events.get(), 5) == {"type": "token", "text": "x"}
    await eventually_subscribers(client, 0)
