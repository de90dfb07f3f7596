"""The asyncio Redis client the API and the workers share their settings through."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import ReadOnlyError

from core.settings import Settings


def redis_client(settings: Settings, max_connections: int) -> aioredis.Redis:
    """A pooled client for ``REASONQ_REDIS_URL``.

    A command unanswered for ``redis_timeout_s`` fails and redis-py retries it on a new
    connection, so a connection that died without a word never hangs a request or a job.
    A ``READONLY`` answer (the server was demoted to a replica by a failover) also drops the
    connection before the retry: the new one reaches whatever the URL names now.
    """
    return aioredis.from_url(
        settings.redis_url,
        max_connections=max_connections,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry_on_error=[ReadOnlyError],
    )
