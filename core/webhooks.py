"""Webhooks: the signature, the callback URL policy and the durable queue of deliveries.

A delivery is a hash (``keys.webhook(id)``: URL, body, attempts, outcome) plus a member of
the sorted set ``keys.WEBHOOKS_DUE`` scored by the time of its next attempt. Each worker's
sender (``workers.webhooks``) claims due deliveries one script call each: the claim moves
the score a lease into the future and stamps a token, so exactly one worker sends each
attempt, only that worker can record its outcome, and an attempt whose worker died is
claimed again once the lease runs out. Nothing waits in memory, so nothing is lost with a
worker.

Every state change is mirrored, in the same script, into the ``webhook`` field of the hash
the delivery is about (the job's or batch's), so ``GET /v1/jobs/{id}`` and
``GET /v1/batches/{id}`` show it in the one read they already make
(``core.public.webhook_view``).

A batch's summary is queued once its last job ended. The scripts that end a batch (in
``core.jobs`` and ``core.batches``) list it in ``keys.BATCHES_ENDED``; each worker's sender
claims listed batches as it claims deliveries (``BatchSummaries``), renders the summary and
queues it with ``deliver_batch_summary``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from core import keys
from core.errors import CallbackRefused
from core.jobs import TERMINAL, decode
from core.public import batch_view, job_view
from core.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TIMESTAMP_HEADER = "X-Reasonq-Timestamp"
SIGNATURE_HEADER = "X-Reasonq-Signature"
DELIVERY_HEADER = "X-Reasonq-Delivery"
ATTEMPT_HEADER = "X-Reasonq-Attempt"


# --- signature -----------------------------------------------------------------------------
def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 keyed by ``secret`` over ``"<timestamp>." + body``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def signed_headers(
    secret: str, body: bytes, timestamp: int, delivery_id: str, attempt: int
) -> dict[str, str]:
    """Headers of one attempt; the timestamp is signed too, so receivers can refuse replays."""
    return {
        "Content-Type": "application/json",
        "User-Agent": "reasonq-webhooks",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
        DELIVERY_HEADER: delivery_id,
        ATTEMPT_HEADER: str(attempt),
    }


# --- callback URL policy -------------------------------------------------------------------
def permitted(ip: IPAddress, allow: list[str]) -> bool:
    """A public unicast address, or one inside an allow-listed network."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback, whatever its notation
    if ip.is_global and not ip.is_multicast:
        return True
    return any(ip in network for network in _networks(allow) if network.version == ip.version)


def _networks(allow: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for entry in allow:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            pass  # a host name: matched by name in check_callback_url
    return networks


async def check_callback_url(url: str, settings: Settings) -> list[IPAddress]:
    """The addresses ``url`` may be called at; raises ``CallbackRefused`` if it may not be.

    Every address its host resolves to must be public or allow-listed
    (``REASONQ_WEBHOOK_ALLOW_HOSTS``), so a name that also resolves to an internal address
    can't be used to reach it. Run at submission and again before each attempt, since DNS
    answers change (rebinding); the sender then connects to a checked address.
    """
    if settings.webhook_secret is None:
        raise CallbackRefused("webhooks are off on this server (no REASONQ_WEBHOOK_SECRET)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused("callback_url must be an http or https URL with a host")
    host = parts.hostname.lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        async with asyncio.timeout(settings.webhook_timeout_s):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
    except (OSError, ValueError, TimeoutError) as exc:
        raise CallbackRefused(f"callback_url host {host!r} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    if host in (entry.lower() for entry in settings.webhook_allow_hosts):
        return addresses
    for ip in addresses:
        if not permitted(ip, settings.webhook_allow_hosts):
            raise CallbackRefused(
                f"callback_url host {host!r} resolves to {ip}, which is not a public address"
            )
    return addresses


# --- the delivery queue --------------------------------------------------------------------
# Writes the delivery's state as JSON into the hash it is about, if that still exists.
_MIRROR = """
local function mirror(delivery)
  local target = redis.call('HGET', delivery, 'mirror')
  if not target or redis.call('EXISTS', target) == 0 then return end
  local f = redis.call('HMGET', delivery, 'status', 'attempts', 'last_status', 'last_error',
                       'delivered_at', 'next_attempt_at')
  redis.call('HSET', target, 'webhook', cjson.encode({
    status = f[1], attempts = tonumber(f[2]), last_status = tonumber(f[3]),
    last_error = f[4] or nil, delivered_at = tonumber(f[5]), next_attempt_at = tonumber(f[6])}))
end
"""

# KEYS: delivery, due. ARGV: id, url, body, mirror ('' = none), now, ttl.
# Once per delivery id: a second enqueue (a redelivered job message) changes nothing.
_ENQUEUE = _MIRROR + """
if redis.call('HSETNX', KEYS[1], 'url', ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'body', ARGV[3], 'status', 'pending', 'attempts', 0,
           'next_attempt_at', ARGV[5])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'mirror', ARGV[4]) end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
mirror(KEYS[1])
return 1
"""

# KEYS: due, delivery. ARGV: id, now, lease_until, token. Returns {url, body, attempts} or nil.
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return nil end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return nil
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], 'claim', ARGV[4])
return redis.call('HMGET', KEYS[2], 'url', 'body', 'attempts')
"""

# KEYS: delivery, due. ARGV: id, token, now, status (pending|delivered|failed), last_status,
# last_error ('' = none), next_at. Ignored unless the claim is still this attempt's.
_RECORD = _MIRROR + """
if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'claim', 'next_attempt_at', 'last_status', 'last_error')
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'last_status', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'last_error', ARGV[6]) end
if ARGV[4] == 'pending' then
  redis.call('HSET', KEYS[1], 'next_attempt_at', ARGV[7])
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[1])
else
  if ARGV[4] == 'delivered' then redis.call('HSET', KEYS[1], 'delivered_at', ARGV[3]) end
  redis.call('HDEL', KEYS[1], 'body')
  redis.call('ZREM', KEYS[2], ARGV[1])
end
mirror(KEYS[1])
return 1
"""

Outcome = Literal["pending", "delivered", "failed"]


@dataclass(frozen=True)
class Claim:
    """One attempt a worker now holds: send ``body`` to ``url``, then ``record`` it."""

    delivery_id: str
    token: str
    url: str
    body: bytes
    attempt: int  # 1 for the first


class DeliveryQueue:
    """Deliveries waiting in Redis; any process may enqueue, workers claim and record."""

    def __init__(self, redis: aioredis.Redis, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._enqueue = redis.register_script(_ENQUEUE)
        self._claim = redis.register_script(_CLAIM)
        self._record = redis.register_script(_RECORD)

    async def enqueue(
        self, delivery_id: str, url: str, body: bytes, now: float, mirror: str | None = None
    ) -> bool:
        """Queue ``body`` for ``url``, due now; False if this delivery id was queued before.
        ``mirror``: the hash whose ``webhook`` field shows the delivery's state."""
        added = await self._enqueue(
            keys=[keys.webhook(delivery_id), keys.WEBHOOKS_DUE],
            args=[delivery_id, url, body, mirror or "", now, self.ttl_s],
        )
        return bool(added)

    async def claim(self, now: float, lease_s: float, limit: int) -> list[Claim]:
        """Up to ``limit`` due deliveries, each now held by the caller for ``lease_s``."""
        due = await self.redis.zrangebyscore(keys.WEBHOOKS_DUE, "-inf", now, start=0, num=limit)
        token = uuid.uuid4().hex
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in due:
                delivery_id = member.decode()
                await self._claim(
                    keys=[keys.WEBHOOKS_DUE, keys.webhook(delivery_id)],
                    args=[delivery_id, now, now + lease_s, token],
                    client=pipe,
                )
            replies = await pipe.execute()
        return [
            Claim(member.decode(), token, reply[0].decode(), reply[1], int(reply[2]) + 1)
            for member, reply in zip(due, replies, strict=True)
            if reply
        ]

    async def record(
        self,
        claim: Claim,
        now: float,
        outcome: Outcome,
        last_status: int | None,
        last_error: str | None,
        next_at: float = 0.0,
    ) -> bool:
        """Store how the attempt went; ``pending`` queues the next one at ``next_at``."""
        done = await self._record(
            keys=[keys.webhook(claim.delivery_id), keys.WEBHOOKS_DUE],
            args=[
                claim.delivery_id, claim.token, now, outcome,
                "" if last_status is None else last_status, last_error or "", next_at,
            ],
        )
        return bool(done)


# --- what is delivered ---------------------------------------------------------------------
async def enqueue_job(redis: aioredis.Redis, job_id: str, settings: Settings, now: float) -> bool:
    """Queue the POST of an ended job to its ``callback_url``: the job as ``GET`` shows it,
    less the ``webhook`` field that describes this delivery. A no-op for a job without a
    callback, one still queued or running, or one whose delivery was queued already."""
    record = decode(await redis.hgetall(keys.job(job_id)))
    if "callback_url" not in record or "webhook" in record or record["status"] not in TERMINAL:
        return False
    view = job_view(record, settings.public_url or record.get("api_url", ""))
    del view["webhook"]
    queue = DeliveryQueue(redis, settings.result_ttl_s)
    return await queue.enqueue(
        f"job:{job_id}", record["callback_url"], _json(view), now, mirror=keys.job(job_id)
    )


async def deliver_batch_summary(
    redis: aioredis.Redis,
    batch_id: str,
    callback_url: str,
    summary: dict[str, Any],
    settings: Settings,
    now: float,
) -> bool:
    """Queue the POST of a batch's ``summary`` to its ``callback_url`` when the batch ends.

    ``BatchSummaries.queue`` calls it once the batch's last job ended (calling again is
    harmless: one delivery per batch). The URL was checked with ``check_callback_url`` when
    the batch was created. The delivery's state is mirrored into the batch hash's
    ``webhook`` field (as for jobs), which ``core.public.webhook_view`` renders.
    """
    queue = DeliveryQueue(redis, settings.result_ttl_s)
    return await queue.enqueue(
        f"batch:{batch_id}", callback_url, _json(summary), now, mirror=keys.batch(batch_id)
    )


# KEYS: ended. ARGV: now, lease_until, limit. The listed batches that are due, each now held
# by the caller until lease_until: one worker queues each summary, and one whose worker died
# is claimed again once the lease runs out.
_CLAIM_ENDED = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


def batch_summary(record: dict[str, str], settings: Settings, now: float) -> dict[str, Any]:
    """What a batch's callback gets: the batch as ``GET`` shows it, less the ``webhook`` field
    that describes this delivery."""
    view = batch_view(record, settings.public_url or record.get("api_url", ""), now)
    del view["webhook"]
    return view


class BatchSummaries:
    """Ended batches (``keys.BATCHES_ENDED``) whose summary a worker is to queue."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._claim = redis.register_script(_CLAIM_ENDED)

    async def claim(self, now: float, lease_s: float, limit: int) -> list[str]:
        """Up to ``limit`` ended batches, each now held by the caller for ``lease_s``."""
        ids = await self._claim(keys=[keys.BATCHES_ENDED], args=[now, now + lease_s, limit])
        return [batch_id.decode() for batch_id in ids]

    async def queue(self, batch_id: str, now: float) -> bool:
        """Queue the claimed batch's summary and unlist it; False if it was queued before
        (a claim whose worker died after queueing) or the batch expired meanwhile."""
        record = decode(await self.redis.hgetall(keys.batch(batch_id)))
        queued = False
        if "callback_url" in record and "finished_at" in record:
            summary = batch_summary(record, self.settings, now)
            queued = await deliver_batch_summary(
                self.redis, batch_id, record["callback_url"], summary, self.settings, now
            )
        await self.redis.zrem(keys.BATCHES_ENDED, batch_id)
        return queued


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
