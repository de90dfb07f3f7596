"""Finds queued jobs whose message was lost on its way to a worker, and publishes it again.

kombu's Redis transport takes a message with BRPOP, which removes it from the queue at
once; the delivery (``unacked``, what redelivery restores from) is recorded later, by the
script that starts the job (``core.redis_transport``). A worker killed in between loses the
message: no queue holds it, no lease covers it, and its job would stay ``queued`` forever.

Each queued job is listed in its queue's waiting set (``keys.waiting``, kept by the job
scripts in ``core.jobs``) until a worker starts it. Every sweep (one worker at a time)
looks at jobs waiting longer than the visibility timeout and asks where their message is:

- still in the queue: a queue is FIFO per priority, so a job created well before the
  oldest message left in its priority list (or whose list is empty) is no longer in it;
- delivered to a live worker: listed in kombu's ``unacked`` hash.

A job found in neither place on two sweeps in a row is an orphan: its message is rebuilt
from the job hash and published again. Doubt costs little: a job that turns out to have
two messages runs once (the second finds it running or ended, ``core.jobs``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core import keys
from core.broker import task_message
from core.jobs import decode
from core.settings import Settings

log = logging.getLogger("reasonq.worker")

# Publish order may trail creation order by this much (API requests race to publish).
ORDER_SLACK_S = 5.0
BATCH = 500  # jobs looked at per queue and sweep
_JSON_FIELDS = ("request", "metadata")
_INT_FIELDS = ("priority", "prompt_chars", "batch_index")


class OrphanSweeper:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.interval_s = max(1.0, float(settings.restore_interval_s))
        self.grace_s = float(settings.visibility_timeout_s)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except RedisError as exc:  # Redis restarting: next sweep
                log.warning("orphan sweep: %s", exc)
            except Exception:
                log.exception("orphan sweep")

    async def sweep(self) -> list[str]:
        """One look at each queue no other worker swept this interval; returns the jobs
        published again."""
        now = time.time()
        lease_ms = int(self.interval_s * 900)
        republished: list[str] = []
        for queue in self.settings.queues:
            if not await self.redis.set(keys.orphan_lock(queue), 1, nx=True, px=lease_ms):
                continue
            ids = await self.redis.zrangebyscore(
                keys.waiting(queue), "-inf", now - self.grace_s, start=0, num=BATCH
            )
            if ids:
                republished += await self._sweep_queue(queue, [i.decode() for i in ids], now)
        return republished

    async def _sweep_queue(self, queue: str, ids: list[str], now: float) -> list[str]:
        lists = keys.queue_lists(queue)  # index = kombu priority = 9 - job priority
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(keys.job(job_id), "status", "priority", "created_at")
            for name in lists:
                pipe.lindex(name, -1)  # the oldest message left: the next one taken
            replies = await pipe.execute()
        rows, tails = replies[: len(ids)], replies[len(ids) :]
        tail_created = await self._tail_created([_message_id(t) for t in tails])
        missing: list[str] = []
        for job_id, (status, priority, created) in zip(ids, rows, strict=True):
            if status != b"queued":  # ended or started without passing through start
                await self.redis.zrem(keys.waiting(queue), job_id)
                continue
            tail = tail_created[9 - int(priority or 5)]
            if tail > float(created or 0) + ORDER_SLACK_S:
                missing.append(job_id)  # consumers went past it: not in its list
        if not missing:
            return []
        delivered = {_message_id(v) for v in await self.redis.hvals(keys.UNACKED)}
        missing = [j for j in missing if j not in delivered]
        return await self._confirm(missing, now)

    async def _confirm(self, missing: list[str], now: float) -> list[str]:
        """Suspects seen missing on an earlier sweep too are orphans: publish them again."""
        orphans: list[str] = []
        for job_id in missing:
            first = await self.redis.zscore(keys.ORPHAN_SUSPECTS, job_id)
            if first is None:
                await self.redis.zadd(keys.ORPHAN_SUSPECTS, {job_id: now})
            elif now - first >= self.interval_s:
                orphans.append(job_id)
        for job_id in orphans:
            row = decode(await self.redis.hgetall(keys.job(job_id)))
            if row.get("status") == "queued":
                log.warning("job %s: its message was lost (worker died taking it); "
                            "publishing it again", job_id)  # fmt: skip
                await self.redis.lpush(*task_message(record_of(row), show_content=False))
            await self.redis.zrem(keys.ORPHAN_SUSPECTS, job_id)
        return orphans

    async def _tail_created(self, job_ids: list[str | None]) -> list[float]:
        """Creation time of each list's oldest message: +inf for an empty list (nothing
        waiting is in it), -inf when unknown (its job hash is gone or not yet written)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id or "-"), "created_at")
            values = await pipe.execute()
        return [
            float("inf") if job_id is None else float(v) if v is not None else float("-inf")
            for job_id, v in zip(job_ids, values, strict=True)
        ]


def _message_id(raw: bytes | None) -> str | None:
    """The task (= job) id of a kombu message, as queued or as kept in ``unacked``."""
    if raw is None:
        return None
    message = json.loads(raw)
    if isinstance(message, list):  # unacked: [message, exchange, routing key]
        message = message[0]
    return message.get("headers", {}).get("id")


def record_of(row: dict[str, str]) -> dict[str, Any]:
    """The job's record as the API published it, from its hash."""
    record: dict[str, Any] = {}
    for field, value in row.items():
        if field in _JSON_FIELDS:
            record[field] = json.loads(value)
        elif field in _INT_FIELDS:
            record[field] = int(value)
        elif field == "created_at":
            record[field] = float(value)
        else:
            record[field] = value
    return record
