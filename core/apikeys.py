"""API keys: created by ``reasonq keys``, checked by the API on every request.

A key reads ``rq_<id>_<secret>``: the id names its Redis hash (``keys.api_key``), the
secret is 256 random bits. Redis keeps only the SHA-256 of the whole key; a salt or a
slow hash would add nothing, as nobody can guess 256 random bits. The id is not secret:
it owns the key's jobs (``owner`` field) and is what ``keys revoke`` takes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import redis

from core import keys

PREFIX = "rq_"


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    revoked: bool
    rate_limit_per_s: float | None  # job submissions per second; None = unlimited
    max_concurrent_jobs: int | None  # queued + running jobs; None = unlimited

    @classmethod
    def from_record(cls, key_id: str, record: dict[str, str]) -> ApiKey:
        return cls(
            id=key_id,
            name=record["name"],
            created_at=float(record["created_at"]),
            revoked=record.get("revoked") == "1",
            rate_limit_per_s=float(v) if (v := record.get("rate_limit_per_s")) else None,
            max_concurrent_jobs=int(v) if (v := record.get("max_concurrent_jobs")) else None,
        )


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def key_id_of(token: str) -> str | None:
    """The id a presented key claims, or None when it is not shaped like one of ours."""
    if not token.startswith(PREFIX):
        return None
    key_id, sep, secret = token[len(PREFIX) :].partition("_")
    return key_id if sep and key_id.isalnum() and secret else None


def verify(token: str, record: dict[str, str]) -> ApiKey | None:
    """The key if ``token`` matches its stored hash and it is not revoked."""
    key_id = key_id_of(token)
    if key_id is None or "hash" not in record:
        return None
    if not hmac.compare_digest(record["hash"], digest(token)):
        return None
    key = ApiKey.from_record(key_id, record)
    return None if key.revoked else key


def create(
    client: redis.Redis,
    name: str,
    rate_limit_per_s: float | None = None,
    max_concurrent_jobs: int | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key; returns it and the secret key string (never stored, shown once)."""
    key_id = secrets.token_hex(6)
    token = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    record = {
        "name": name,
        "hash": digest(token),
        "created_at": repr(time.time()),
        "revoked": "0",
        "rate_limit_per_s": "" if rate_limit_per_s is None else repr(rate_limit_per_s),
        "max_concurrent_jobs": "" if max_concurrent_jobs is None else str(max_concurrent_jobs),
    }
    with client.pipeline() as pipe:
        pipe.hset(keys.api_key(key_id), mapping=record)
        pipe.sadd(keys.API_KEYS, key_id)
        pipe.execute()
    return ApiKey.from_record(key_id, record), token


def list_keys(client: redis.Redis) -> list[tuple[ApiKey, int]]:
    """Every key with its number of queued + running jobs, oldest first."""
    ids = sorted(m.decode() for m in client.smembers(keys.API_KEYS))
    with client.pipeline(transaction=False) as pipe:
        for key_id in ids:
            pipe.hgetall(keys.api_key(key_id))
            pipe.scard(keys.owner_active(key_id))
        replies = pipe.execute()
    found = [
        (ApiKey.from_record(key_id, {k.decode(): v.decode() for k, v in record.items()}), active)
        for key_id, record, active in zip(ids, replies[::2], replies[1::2], strict=True)
        if record
    ]
    return sorted(found, key=lambda pair: pair[0].created_at)


def revoke(client: redis.Redis, key_id: str) -> bool:
    """Revoke a key at once (the API checks every request); False if there is no such key."""
    if not client.exists(keys.api_key(key_id)):
        return False
    client.hset(keys.api_key(key_id), mapping={"revoked": "1", "revoked_at": repr(time.time())})
    return True
