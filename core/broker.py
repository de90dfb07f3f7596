"""The Celery application: broker, durability and pool settings, in one place.

The API imports it only to publish by task name (``RUN_JOB``); workers import
``workers.celery_app``, which adds the worker-side hooks.

Durability: jobs are acknowledged only after they finish (``acks_late``), so a worker that
dies mid-job leaves its message unacknowledged and the broker hands it to another worker
after ``REASONQ_VISIBILITY_TIMEOUT_S`` plus at most one ``REASONQ_RESTORE_INTERVAL_S``
sweep. Live workers renew the lease of the jobs they run (``workers.executor``), so a
long job is never redelivered while it still runs.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from core.settings import settings

RUN_JOB = "reasonq.run_job"

app = Celery("reasonq", broker=settings.redis_url, include=["workers.tasks"])

app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,  # job state lives in core.jobs, not in a result backend
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_acks_on_failure_or_timeout=True,
    task_queues=[Queue(name) for name in settings.queues],
    task_default_queue=settings.queues[0],
    # One message reserved per free slot: a busy worker never hoards jobs an idle one could run.
    worker_prefetch_multiplier=1,
    # HTTP generations are I/O bound: threads park on an asyncio loop shared per process.
    worker_pool="threads",
    worker_concurrency=settings.worker_concurrency,
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_pool_limit=settings.worker_concurrency + 10,
    broker_transport_options={
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": settings.restore_interval_s,
        "unacked_restore_throttle": 1,
        # Ten priority lists per queue; the API maps job priority 9 (highest) to list 0.
        "priority_steps": list(range(10)),
        "queue_order_strategy": "priority",
        "max_connections": settings.worker_concurrency + 20,
        "socket_timeout": 30,
        "health_check_interval": 10,
    },
)
