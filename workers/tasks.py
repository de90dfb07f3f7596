"""The one Celery task: run a job by id. Thin on purpose; the work is in ``executor``."""

from __future__ import annotations

from typing import Any

from celery.exceptions import Ignore, Reject
from celery.signals import task_received, task_revoked
from celery.worker import state as worker_state

from core import redis_transport
from core.broker import RUN_JOB, app
from core.errors import REDIS_UNAVAILABLE
from core.jobs import JobStatus
from core.settings import settings
from workers.executor import Executor

executor = Executor(settings)
# The executor's start script records these deliveries for the broker (core.redis_transport).
redis_transport.deferred.tasks = frozenset({RUN_JOB})


@task_received.connect
def _begin(request: Any, **_: object) -> None:
    """Start the job as the consumer receives its message (revoked ones never get here),
    rather than once a pool thread picks it up: one thread wake-up less per job."""
    delivery_tag = (request.request_dict.get("properties") or {}).get("delivery_tag")
    if request.name == RUN_JOB and delivery_tag:
        job_id, spec = request.args
        executor.begin(job_id, spec, delivery_tag, bool(request.delivery_info["redelivered"]))


@task_revoked.connect
def _revoked(sender: Any, request: Any, **_: object) -> None:
    """A revoked job is cancelled: its message dropped unrun (Revoke), or the run stopped
    at its next token (Terminate; ``workers.pool`` signals no thread)."""
    if getattr(sender, "name", None) == RUN_JOB:
        executor.revoke(request.id)


@app.task(name=RUN_JOB, bind=True)
def run_job(self: Any, job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run job ``job_id``; ``spec`` is its full record, so a worker never depends on the
    API having finished writing the job hash."""
    delivery_tag = (self.request.properties or {}).get("delivery_tag")
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    try:
        summary = executor.run(job_id, spec, delivery_tag, redelivered)
    except REDIS_UNAVAILABLE as exc:
        # Redis stayed unavailable past the executor's retries: hand the message back (if
        # Redis still refuses, its lease expires and it is restored) rather than ack a job
        # whose end was never recorded.
        raise Reject(f"Redis unavailable: {exc}", requeue=True) from exc
    if summary["status"] == JobStatus.CANCELLED and job_id in worker_state.revoked:
        # Terminated (Flower, revoke --terminate): acknowledged without a success event, so
        # the task stays REVOKED in Flower instead of turning SUCCESS.
        raise Ignore()
    return summary
