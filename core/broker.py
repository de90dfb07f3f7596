"""The Celery application: broker, durability and pool settings, in one place.

The API imports it only to build job messages (``task_message``), which ``core.jobs``
pushes; workers import ``workers.celery_app``, which adds the worker-side hooks.

Durability: jobs are acknowledged only after they finish (``acks_late``), so a worker that
dies mid-job leaves its message unacknowledged and the broker hands it to another worker
after ``REASONQ_VISIBILITY_TIMEOUT_S`` plus at most one ``REASONQ_RESTORE_INTERVAL_S``
sweep. Live workers renew the lease of the jobs they run (``workers.executor``), so a
long job is never redelivered while it still runs.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any, NamedTuple

from celery import Celery
from kombu import Queue
from kombu.serialization import dumps

from core import keys, redis_transport
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
    # HTTP generations are I/O bound: threads park on an asyncio loop shared per process
    # (Celery's thread pool, adapted in workers.pool).
    worker_pool="workers.pool:TaskPool",
    worker_concurrency=settings.worker_concurrency,
    worker_send_task_events=True,
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
    **redis_transport.celery_options(settings.redis_url),
)


class TaskMessage(NamedTuple):
    """A job's message as kombu's Redis transport keeps it: an entry of a Redis list."""

    queue_list: str
    entry: str


def task_message(record: dict[str, Any], show_content: bool) -> TaskMessage:
    """The ``run_job(id, record)`` message for a new job, for ``core.jobs`` to push in the
    same script that stores the job: accepting a job is then one Redis round trip, with no
    window between the two, and kombu's blocking client stays off the API's event loop.

    The message itself is Celery's (protocol 2, ``create_task_message``); only kombu's
    envelope is written here, as ``kombu.transport.redis.Channel._put`` writes it
    (``tests/test_broker.py`` compares the two). Flower sees argument sizes, not prompts,
    unless ``show_content``.
    """
    job_id = record["id"]
    summary = {
        "runtime": record["runtime"],
        "task_type": record["task_type"],
        "prompt_chars": record["prompt_chars"],
    }
    message = app.amqp.create_task_message(
        job_id,
        RUN_JOB,
        [job_id, record],
        argsrepr=None if show_content else repr((job_id,)),
        kwargsrepr=None if show_content else repr(summary),
        ignore_result=None,  # as send_task leaves it: the app's setting decides
    )
    content_type, content_encoding, body = dumps(message.body, serializer="json")
    # kombu's Redis transport serves priority list 0 first; ours is 9 = most urgent.
    priority = 9 - record["priority"]
    envelope = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": message.headers,
        "properties": {
            **message.properties,
            "delivery_mode": 2,  # persistent
            "delivery_info": {"exchange": "", "routing_key": record["queue"]},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return TaskMessage(keys.queue_lists(record["queue"])[priority], json.dumps(envelope))
