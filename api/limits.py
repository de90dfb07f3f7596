"""Per-key limits on job submission: a rate limit and a concurrent-job quota, in Redis.

Both live in Redis so every API replica enforces the same budget. Keys without limits (and
the anonymous caller when auth is off) skip both checks.

Rate: a token bucket per key that holds one second's worth of requests (at least one) and
refills at the key's rate, on Redis' own clock so replicas agree.

Quota: the owner's queued and running job ids form a set (``keys.owner_active``). Admission
adds ids only while the set is under the limit; the job scripts in ``core.jobs`` remove an
id in the same script as its terminal transition. A set, not a counter, so a job admitted
twice (an Idempotency-Key retry republishing it) or ended twice counts once.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request

from api.deps import OwnerDep, RedisDep
from core import keys
from core.apikeys import ApiKey
from core.errors import QuotaExceeded, RateLimited

# A slot frees when one of the owner's jobs ends, which nobody can predict: a short hint.
QUOTA_RETRY_AFTER_S = 2

# KEYS: bucket. ARGV: rate per second, capacity. Returns 0 (taken) or ms until a token.
_TAKE_TOKEN = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local wait_ms = 0
if tokens >= 1 then tokens = tokens - 1 else wait_ms = math.ceil((1 - tokens) / rate * 1000) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return wait_ms
"""

# KEYS: owner's active set. ARGV: limit, job ids... Adds all ids or none; returns 1 / 0.
_ADMIT = """
local new = 0
for i = 2, #ARGV do new = new + 1 - redis.call('SISMEMBER', KEYS[1], ARGV[i]) end
if new > 0 and redis.call('SCARD', KEYS[1]) + new > tonumber(ARGV[1]) then return 0 end
for i = 2, #ARGV do redis.call('SADD', KEYS[1], ARGV[i]) end
return 1
"""


async def get_api_key(request: Request) -> ApiKey | None:
    """The caller's key (set by ``api.auth``); None when auth is off."""
    return getattr(request.state, "api_key", None)


ApiKeyDep = Annotated[ApiKey | None, Depends(get_api_key)]


async def rate_limit(redis: RedisDep, key: ApiKeyDep) -> None:
    """Route dependency: take one token from the caller's bucket or answer 429."""
    if key is None or key.rate_limit_per_s is None:
        return
    rate = key.rate_limit_per_s
    wait_ms = await redis.eval(_TAKE_TOKEN, 1, keys.rate_bucket(key.id), rate, max(1.0, rate))
    if wait_ms:
        raise RateLimited(
            f"rate limit of {rate:g} submissions/s exceeded", math.ceil(int(wait_ms) / 1000)
        )


class Quota:
    """The caller's concurrent-job quota, bound to one request."""

    def __init__(self, redis: aioredis.Redis, owner: str, key: ApiKey | None) -> None:
        self.redis, self.owner, self.key = redis, owner, key

    @asynccontextmanager
    async def admit(self, job_ids: list[str]) -> AsyncIterator[None]:
        """Count ``job_ids`` as active (or raise ``QuotaExceeded``) around their publish;
        if publishing fails they are uncounted, as no job will end to release them."""
        limit = self.key.max_concurrent_jobs if self.key else None
        if limit is None:
            yield
            return
        active = keys.owner_active(self.owner)
        if not await self.redis.eval(_ADMIT, 1, active, limit, *job_ids):
            raise QuotaExceeded(
                f"{limit} queued or running jobs is this key's limit; retry when one ends",
                QUOTA_RETRY_AFTER_S,
            )
        try:
            yield
        except BaseException:
            await self.redis.srem(active, *job_ids)
            raise


async def get_quota(redis: RedisDep, owner: OwnerDep, key: ApiKeyDep) -> Quota:
    return Quota(redis, owner, key)


QuotaDep = Annotated[Quota, Depends(get_quota)]
RateLimit = Depends(rate_limit)
"""Put in a submitting route's ``dependencies=[...]``."""
