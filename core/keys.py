"""Every Redis key and channel name reasonq uses, built only here."""

from __future__ import annotations

PREFIX = "reasonq"


def job(job_id: str) -> str:
    """Hash holding one job's state, request and result."""
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: str) -> str:
    """Pub/sub channel of one job's status changes, tokens and final result."""
    return f"{PREFIX}:events:{job_id}"


CONTROL = f"{PREFIX}:control"
"""Pub/sub channel nudging workers at once: ``{"cancel": id}`` or ``{"watch": id}``. The
durable flags (``cancel_requested``, ``job_watchers``) stay the truth; workers also poll them."""


def job_watchers(job_id: str) -> str:
    """Set of a job's event-stream connections; workers publish tokens only while it exists."""
    return f"{PREFIX}:watch:{job_id}"


def webhook(delivery_id: str) -> str:
    """Hash of one webhook delivery: URL, signed body, attempts so far and outcome."""
    return f"{PREFIX}:webhook:{delivery_id}"


WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"
"""Sorted set of pending webhook deliveries, scored by the time of their next attempt."""

BATCHES_ENDED = f"{PREFIX}:webhooks:batches-ended"
"""Sorted set of ended batches with a ``callback_url`` whose summary is not queued yet,
scored by when a worker may take it (the end, then a claim's lease)."""


def idempotency(owner: str, key: str) -> str:
    """Maps a client's Idempotency-Key to the job it created."""
    return f"{PREFIX}:idem:{owner}:{key}"


def inflight(backend: str) -> str:
    """Sorted set of generations in flight on one backend (the shared semaphore)."""
    return f"{PREFIX}:inflight:{backend}"


def worker(hostname: str) -> str:
    """A live worker's heartbeat (its queues), expiring unless refreshed."""
    return f"{PREFIX}:worker:{hostname}"


WORKER_PATTERN = f"{PREFIX}:worker:*"

WAITING_PREFIX = f"{PREFIX}:waiting:"


def waiting(queue: str) -> str:
    """Sorted set of a queue's jobs not yet taken by a worker, scored by creation time: the
    orphan sweep (workers/orphans.py) finds jobs whose message was lost here."""
    return f"{WAITING_PREFIX}{queue}"


ORPHAN_SUSPECTS = f"{PREFIX}:orphans:suspects"
"""Sorted set of queued jobs whose message was found nowhere, scored by when first seen."""


def orphan_lock(queue: str) -> str:
    """Held by the worker sweeping a queue for orphans, so one sweeps it at a time."""
    return f"{PREFIX}:orphans:lock:{queue}"

# kombu's Redis transport keeps each delivered-but-unacked message in this hash (by delivery
# tag) and its tag in this index, scored by delivery time; workers write both for their jobs
# (core.redis_transport) and re-score their running jobs to renew the lease.
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"

# kombu's Redis transport puts priority n (1..9) of a queue in "<queue>\x06\x16<n>" and
# priority 0 in the queue's own name (``_q_for_pri``; core/broker.py sets ten steps).
_PRIORITY_SEP = "\x06\x16"


def queue_lists(queue: str) -> list[str]:
    """The ten Redis lists holding one Celery queue's waiting messages, one per priority."""
    return [queue] + [f"{queue}{_PRIORITY_SEP}{n}" for n in range(1, 10)]


API_KEYS = f"{PREFIX}:apikeys"
"""Set of every API key id (``reasonq keys list``)."""


def api_key(key_id: str) -> str:
    """Hash of one API key: name, sha256 of the secret, created_at, revoked, limits."""
    return f"{PREFIX}:apikey:{key_id}"


def rate_bucket(key_id: str) -> str:
    """Token bucket (tokens, last refill) of one API key's submission rate limit."""
    return f"{PREFIX}:rate:{key_id}"


# The job scripts in core/jobs.py reach an owner's active set from the job's ``owner``
# field alone, so they build the name from this prefix.
OWNER_ACTIVE_PREFIX = f"{PREFIX}:active:"


def owner_active(owner: str) -> str:
    """Set of an owner's job ids that are queued or running (the concurrent-job quota)."""
    return f"{OWNER_ACTIVE_PREFIX}{owner}"


JOBS_FINISHED = f"{PREFIX}:stats:jobs-finished"
"""Hash "<status>:<runtime>" -> jobs that ended so, counted by the job scripts (/metrics)."""


# Batch keys share these prefixes so the job scripts in core/jobs.py can reach the batch
# of a job from its ``batch_id`` field alone.
BATCH_PREFIX = f"{PREFIX}:batch:"
BATCH_EVENTS_PREFIX = f"{PREFIX}:batch-events:"
BATCH_REJECTS_PREFIX = f"{PREFIX}:batch-rejects:"


def batch(batch_id: str) -> str:
    """Hash of one batch: its options, timestamps and per-status job counters."""
    return f"{BATCH_PREFIX}{batch_id}"


def batch_events(batch_id: str) -> str:
    """Pub/sub channel of one batch's progress (a job ended, the batch finished)."""
    return f"{BATCH_EVENTS_PREFIX}{batch_id}"


def batch_rejects(batch_id: str) -> str:
    """Hash row index -> why that row of a batch was not enqueued (JSON)."""
    return f"{BATCH_REJECTS_PREFIX}{batch_id}"


def file(file_id: str) -> str:
    """Hash describing one uploaded file (OpenAI Files API): name, size, purpose."""
    return f"{PREFIX}:file:{file_id}"


def file_content(file_id: str) -> str:
    """String holding an uploaded file's bytes."""
    return f"{PREFIX}:file-content:{file_id}"
