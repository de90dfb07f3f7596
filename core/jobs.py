"""Job state: one Redis hash per job, changed only by the atomic scripts below.

The hash is the single source of truth the API reads. Its fields are flat strings; JSON
fields (``request``, ``metadata``, ``result``, ``error``) hold serialised objects.

Life of a job::

    queued --start--> running --finish--> succeeded | failed | cancelled
       \\--cancel--> cancelled            (a running job is cancelled cooperatively)

Every transition publishes a status event on ``keys.job_events(id)`` in the same script,
so a subscriber never misses the change it is waiting for; a worker's final one carries the
whole hash (``record``), so a waiting client is answered without reading it back. ``run_id`` fences each
delivery: a late writer from a superseded run (its worker was presumed dead) can't
overwrite the state of the run that replaced it.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from string import Template
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from core import keys

if TYPE_CHECKING:
    from core.broker import TaskMessage


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# A job of a batch (``batch_id`` field) moves its batch's counters in the same script as its
# own transition, so they never drift from the jobs. The batch key is derived from the job's
# field rather than passed in, so callers need not know the batch (standalone Redis, where a
# script may touch keys it did not declare). The batch finishes when its last job ends after
# ingest sealed it; then its keys get the batch's TTL, and a batch with a ``callback_url`` is
# listed for its summary webhook here, in the one step that can see it end, whichever
# process ended its last job (a worker, or the API cancelling).
_BATCH_MOVE = Template("""
local function batch_move(job, from, to, now)
  local id = redis.call('HGET', job, 'batch_id')
  if not id then return end
  local batch = '$batch' .. id
  if redis.call('EXISTS', batch) == 0 then return end
  if from == 'running' then redis.call('HINCRBY', batch, 'running', -1) end
  redis.call('HINCRBY', batch, to, 1)
  if to == 'running' then return end
  local done = redis.call('HINCRBY', batch, 'done', 1)
  local event = {type = 'progress', status = to, done = done}
  local sealed, submitted, ttl =
    unpack(redis.call('HMGET', batch, 'sealed_at', 'submitted', 'ttl'))
  if sealed and done == tonumber(submitted) then
    redis.call('HSET', batch, 'finished_at', now)
    redis.call('EXPIRE', batch, ttl)
    redis.call('EXPIRE', '$rejects' .. id, ttl)
    if redis.call('HEXISTS', batch, 'callback_url') == 1 then
      redis.call('ZADD', '$ended', 'NX', now, id)
    end
    event.finished = true
  end
  redis.call('PUBLISH', '$events' .. id, cjson.encode(event))
end
""").substitute(
    batch=keys.BATCH_PREFIX,
    events=keys.BATCH_EVENTS_PREFIX,
    rejects=keys.BATCH_REJECTS_PREFIX,
    ended=keys.BATCHES_ENDED,
)

# Every terminal transition also, in the same script, takes the job out of its owner's active
# set (the concurrent-job quota, api/limits.py) and tallies it by final status and runtime
# (the API's /metrics), so neither can drift from the jobs. Keys come from the job's fields.
_JOB_END = f"""
local function job_end(job, status)
  local id, owner, runtime = unpack(redis.call('HMGET', job, 'id', 'owner', 'runtime'))
  if id and owner then redis.call('SREM', '{keys.OWNER_ACTIVE_PREFIX}' .. owner, id) end
  redis.call('HINCRBY', '{keys.JOBS_FINISHED}', status .. ':' .. (runtime or 'unknown'), 1)
end
"""

# A queued job is listed in its queue's waiting set until a worker takes its message (start)
# or it is cancelled, so a message lost on its way to a worker is noticed (workers/orphans.py).
_WAITING = f"""
local function waiting_add(job)
  local id, status, queue, created =
    unpack(redis.call('HMGET', job, 'id', 'status', 'queue', 'created_at'))
  if id and status == 'queued' and queue then
    redis.call('ZADD', '{keys.WAITING_PREFIX}' .. queue, created or 0, id)
  end
end
local function waiting_done(job)
  local id, queue = unpack(redis.call('HMGET', job, 'id', 'queue'))
  if id and queue then redis.call('ZREM', '{keys.WAITING_PREFIX}' .. queue, id) end
end
"""

# KEYS: job hash, its queue's list. ARGV: message, field, value, field, value ...
# The job and its message are stored together or not at all. Fields already present are
# kept: a worker that re-creates a job's hash from its message (start) never overwrites.
_CREATE = _WAITING + """
redis.call('LPUSH', KEYS[2], ARGV[1])
for i = 2, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
waiting_add(KEYS[1])
return 1
"""

# KEYS: job hash, its events channel, kombu's unacked index and hash.
# ARGV: now, run_id, max_attempts, ttl, redelivered (0/1), delivery tag, unacked entry (both
# '' when the transport recorded the delivery itself), spec field/value pairs...
# Returns {outcome, attempts}; outcome is 'running', 'poison', 'duplicate' (a second message
# for a job already running, not a redelivery) or the terminal status found. The delivery is
# recorded whatever the outcome: its ack removes it.
_START = _JOB_END + _BATCH_MOVE + _WAITING + """
if ARGV[7] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[1], ARGV[6])
  redis.call('HSET', KEYS[4], ARGV[6], ARGV[7])
end
for i = 8, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
waiting_done(KEYS[1])
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return {status, 0} end
-- This run started already: a retry after the reply was lost (Redis restarted).
if redis.call('HGET', KEYS[1], 'run_id') == ARGV[2] then
  return {'running', tonumber(redis.call('HGET', KEYS[1], 'attempts'))}
end
if status == 'running' and ARGV[5] == '0' then return {'duplicate', 0} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[3]) then
  local err = cjson.encode({code = 'poison_job', retryable = false,
    message = 'the worker running this job died ' .. (attempts - 1) ..
              ' times; not retried again'})
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error', err)
  job_end(KEYS[1], 'failed')
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  batch_move(KEYS[1], status, 'failed', ARGV[1])
  redis.call('PUBLISH', KEYS[2], cjson.encode({type = 'status', status = 'failed'}))
  return {'poison', attempts}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'run_id', ARGV[2])
if status == 'queued' then batch_move(KEYS[1], status, 'running', ARGV[1]) end
redis.call('PUBLISH', KEYS[2], cjson.encode({type = 'status', status = 'running'}))
return {'running', attempts}
"""

# ARGV: run_id, status, now, ttl, field/value pairs to store (result or error)...
# Returns 1 when this run's end is recorded (now, or by an earlier try whose reply was lost),
# 0 when another run superseded it.
_FINISH = _JOB_END + _BATCH_MOVE + """
if redis.call('HGET', KEYS[1], 'run_id') ~= ARGV[1] then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
-- This run ended already: a retry after the reply was lost (Redis restarted).
if status == ARGV[2] then return 1 end
if status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3])
job_end(KEYS[1], ARGV[2])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
batch_move(KEYS[1], 'running', ARGV[2], ARGV[3])
local fields, record = redis.call('HGETALL', KEYS[1]), {}
for i = 1, #fields, 2 do record[fields[i]] = fields[i + 1] end
redis.call('PUBLISH', KEYS[2], cjson.encode({type = 'status', status = ARGV[2], record = record}))
return 1
"""

# ARGV: now, ttl, control channel. Returns the status after the call, or false for an
# unknown job. A running job is flagged, and its worker nudged on the control channel.
_CANCEL = _JOB_END + _BATCH_MOVE + _WAITING + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' then
  local err = cjson.encode({code = 'cancelled', retryable = false,
                            message = 'cancelled before it ran'})
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1], 'error', err)
  waiting_done(KEYS[1])
  job_end(KEYS[1], 'cancelled')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  batch_move(KEYS[1], status, 'cancelled', ARGV[1])
  redis.call('PUBLISH', KEYS[2], cjson.encode({type = 'status', status = 'cancelled'}))
  return 'cancelled'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  redis.call('PUBLISH', ARGV[3], cjson.encode({cancel = redis.call('HGET', KEYS[1], 'id')}))
end
return status
"""


def _pairs(mapping: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for field, value in mapping.items():
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            value = json.dumps(value, separators=(",", ":"))
        out += [field, str(value)]
    return out


class JobStore:
    """Reads and changes job hashes. One per process, over a shared async Redis client."""

    def __init__(self, redis: aioredis.Redis, result_ttl_s: int) -> None:
        self.redis = redis
        self.result_ttl_s = result_ttl_s
        self._create = redis.register_script(_CREATE)
        self._start = redis.register_script(_START)
        self._finish = redis.register_script(_FINISH)
        self._cancel = redis.register_script(_CANCEL)

    async def create(
        self, record: dict[str, Any], message: TaskMessage, pipe: Any = None
    ) -> dict[str, str]:
        """Store a new job and push its message (``core.broker.task_message``), atomically.
        Returns the job as its hash holds it (what ``get`` returns)."""
        pairs = _pairs(record)
        await self._create(
            keys=[keys.job(record["id"]), message.queue_list],
            args=[message.entry, *pairs],
            client=pipe,
        )
        return dict(zip(pairs[::2], pairs[1::2], strict=True))

    async def get(self, job_id: str) -> dict[str, str] | None:
        record = await self.redis.hgetall(keys.job(job_id))
        return decode(record) if record else None

    async def start(
        self,
        job_id: str,
        run_id: str,
        max_attempts: int,
        spec: dict[str, Any],
        redelivered: bool,
        delivery: tuple[str, str] | None = None,
    ) -> tuple[str, int]:
        """Mark the job running for ``run_id``; a redelivery takes over a running job whose
        worker died, a plain duplicate message does not. ``delivery``: (tag, unacked entry)
        to record for the broker, when the transport left that to this script
        (``core.redis_transport``)."""
        tag, entry = delivery or ("", "")
        outcome, attempts = await self._start(
            keys=[keys.job(job_id), keys.job_events(job_id), keys.UNACKED_INDEX, keys.UNACKED],
            args=[
                time.time(), run_id, max_attempts, self.result_ttl_s, int(redelivered),
                tag, entry, *_pairs(spec),
            ],
        )
        return _str(outcome), int(attempts)

    async def finish(
        self, job_id: str, run_id: str, status: JobStatus, fields: dict[str, Any]
    ) -> bool:
        """Record the end of ``run_id``; False when another run superseded it. Safe to
        retry: a retry of a recorded end returns True again, so its webhook is queued."""
        done = await self._finish(
            keys=[keys.job(job_id), keys.job_events(job_id)],
            args=[run_id, status.value, time.time(), self.result_ttl_s, *_pairs(fields)],
        )
        return bool(done)

    async def cancel(self, job_id: str) -> str | None:
        status = await self._cancel(
            keys=[keys.job(job_id), keys.job_events(job_id)],
            args=[time.time(), self.result_ttl_s, keys.CONTROL],
        )
        return _str(status) if status else None

    async def cancel_many(self, job_ids: list[str]) -> None:
        """Cancel many jobs (a batch's) in one round trip, as ``cancel`` does each."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                await self._cancel(
                    keys=[keys.job(job_id), keys.job_events(job_id)],
                    args=[time.time(), self.result_ttl_s, keys.CONTROL],
                    client=pipe,
                )
            await pipe.execute()


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode(record: dict[bytes | str, bytes | str]) -> dict[str, str]:
    return {_str(k): _str(v) for k, v in record.items()}
