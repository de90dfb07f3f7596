"""Batch state: one Redis hash per batch, its rejected rows, and the jobs of its rows.

Row ``i`` of batch ``b`` becomes the ordinary job ``b-i`` (``batch_job_id``), so results
come back in input order by index, with no list of ids to keep. The counters (``running``,
one per terminal status, ``done``) are moved by the job scripts of ``core.jobs`` in the
same step as the job itself; ingest only counts what it enqueued (``submitted``) and what
it refused (``rejected``), then seals the batch. Life of a batch::

    ingesting --seal--> in progress --last job ends--> finished (completed or cancelled)
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from core import keys
from core.jobs import JobStore, decode

if TYPE_CHECKING:
    from core.broker import TaskMessage

COUNTERS = ("submitted", "rejected", "running", "succeeded", "failed", "cancelled", "done")

# KEYS: batch, rejects, events, ended. ARGV: now, batch id. Ingest is over: the total is
# known; a batch whose jobs all ended already (or that has none) finishes here, as the job
# scripts can't, and is listed for its summary webhook as they would have.
_SEAL = """
local submitted, rejected, done, ttl =
  unpack(redis.call('HMGET', KEYS[1], 'submitted', 'rejected', 'done', 'ttl'))
redis.call('HSET', KEYS[1], 'sealed_at', ARGV[1],
           'total', tonumber(submitted) + tonumber(rejected))
if tonumber(done) == tonumber(submitted) then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  if redis.call('HEXISTS', KEYS[1], 'callback_url') == 1 then
    redis.call('ZADD', KEYS[4], 'NX', ARGV[1], ARGV[2])
  end
  redis.call('PUBLISH', KEYS[3], cjson.encode({type = 'progress', done = tonumber(done),
                                               finished = true}))
end
return 1
"""

# Job fields a result row needs.
RESULT_FIELDS = ("status", "result", "error", "batch_row_id", "created_at", "finished_at")


def batch_job_id(batch_id: str, index: int) -> str:
    """The job of row ``index`` of a batch."""
    return f"{batch_id}-{index}"


class BatchStore:
    """Reads and changes batch hashes, over the API's shared async Redis client."""

    def __init__(self, redis: aioredis.Redis, jobs: JobStore) -> None:
        self.redis = redis
        self.jobs = jobs
        self._seal = redis.register_script(_SEAL)

    async def create(self, batch_id: str, fields: dict[str, Any]) -> None:
        """A new batch with zeroed counters; its keys live ``result_ttl_s`` once finished."""
        mapping = {k: _text(v) for k, v in fields.items() if v is not None}
        mapping.update({name: "0" for name in COUNTERS})
        mapping.update(id=batch_id, created_at=str(time.time()), ttl=str(self.jobs.result_ttl_s))
        await self.redis.hset(keys.batch(batch_id), mapping=mapping)

    async def add_rows(
        self,
        batch_id: str,
        records: list[dict[str, Any]],
        messages: list[TaskMessage],
        rejects: dict[int, dict[str, Any]],
    ) -> bool:
        """Store the jobs of ``records`` with their ``messages`` and the ``rejects`` (by row
        index) in one round trip; False when the batch was cancelled meanwhile (stop
        ingesting)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for record, message in zip(records, messages, strict=True):
                await self.jobs.create(record, message, pipe=pipe)
            if rejects:
                pipe.hset(
                    keys.batch_rejects(batch_id),
                    mapping={str(i): json.dumps(r) for i, r in rejects.items()},
                )
            pipe.hincrby(keys.batch(batch_id), "submitted", len(records))
            pipe.hincrby(keys.batch(batch_id), "rejected", len(rejects))
            pipe.hexists(keys.batch(batch_id), "cancel_requested_at")
            replies = await pipe.execute()
        return not replies[-1]

    async def seal(self, batch_id: str) -> None:
        await self._seal(
            keys=[
                keys.batch(batch_id), keys.batch_rejects(batch_id), keys.batch_events(batch_id),
                keys.BATCHES_ENDED,
            ],
            args=[time.time(), batch_id],
        )

    async def set(self, batch_id: str, **fields: Any) -> None:
        await self.redis.hset(keys.batch(batch_id), mapping={k: _text(v) for k, v in fields.items()})

    async def get(self, batch_id: str) -> dict[str, str] | None:
        record = await self.redis.hgetall(keys.batch(batch_id))
        return decode(record) if record else None

    async def request_cancel(self, batch_id: str) -> bool:
        """Mark the batch cancelled (ingest stops); False if it was already."""
        return bool(
            await self.redis.hsetnx(keys.batch(batch_id), "cancel_requested_at", time.time())
        )

    async def cancel(self, batch_id: str, chunk: int = 1000) -> None:
        """Cancel every job of the batch that has not ended; ingest stops at its next chunk
        (and cancels that chunk itself, in case it was stored after this read)."""
        await self.request_cancel(batch_id)
        submitted = int(await self.redis.hget(keys.batch(batch_id), "submitted") or 0)
        for start in range(0, submitted, chunk):
            stop = min(start + chunk, submitted)
            await self.jobs.cancel_many([batch_job_id(batch_id, i) for i in range(start, stop)])

    async def rows(self, batch_id: str, start: int, stop: int) -> list[dict[str, Any]]:
        """Rows ``start``..``stop - 1``: each a job's ``RESULT_FIELDS`` (JSON fields parsed),
        or ``{"status": "rejected", ...}`` for a refused row, with its ``index``."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for index in range(start, stop):
                pipe.hmget(keys.job(batch_job_id(batch_id, index)), RESULT_FIELDS)
            pipe.hmget(keys.batch_rejects(batch_id), [str(i) for i in range(start, stop)])
            *jobs, rejects = await pipe.execute()
        out: list[dict[str, Any]] = []
        for index, values, reject in zip(range(start, stop), jobs, rejects, strict=True):
            row: dict[str, Any] = {"index": index, "job_id": None}
            if values[0] is not None:
                row.update(zip(RESULT_FIELDS, (v.decode() if v else None for v in values)))
                row["job_id"] = batch_job_id(batch_id, index)
                for name in ("result", "error"):
                    row[name] = json.loads(row[name]) if row[name] else None
            elif reject is not None:
                rejected = json.loads(reject)
                row.update(
                    status="rejected",
                    batch_row_id=rejected.get("row_id"),
                    error={"code": "invalid_row", "message": rejected["message"]},
                )
            else:  # expired with its batch, or never stored (ingest stopped by a cancel)
                row.update(status="missing", error=None)
            out.append(row)
        return out


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)
