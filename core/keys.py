"""Every Redis key and channel name reasonq uses, built only here."""

from __future__ import annotations

PREFIX = "reasonq"


def job(job_id: str) -> str:
    """Hash holding one job's state, request and result."""
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: str) -> str:
    """Pub/sub channel of one job's status changes, tokens and final result."""
    return f"{PREFIX}:events:{job_id}"


def job_watchers(job_id: str) -> str:
    """Counter of event-stream clients of a job; workers publish tokens only while it exists."""
    return f"{PREFIX}:watch:{job_id}"


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

# kombu's Redis transport keeps each delivered-but-unacked message here, scored by
# delivery time; workers re-score their running jobs to renew the lease.
UNACKED_INDEX = "unacked_index"
