"""Turning an accepted request into a queued job: profile merge, routing, publish.

Publish first, then write the job hash: the message carries the job's full record, so a
job is never left ``queued`` in Redis without a message that will run it, and a worker
that is faster than the API writes the hash itself (``core.jobs`` keeps whichever came
first). A crash between the two leaves a job that runs but whose 202 was never sent; a
retry with the same Idempotency-Key then finds it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from api.metrics import JOBS_SUBMITTED
from api.schemas import JobCreate
from core.broker import RUN_JOB, app
from core.errors import RoutingError
from core.profiles import load_profiles
from core.settings import Settings


def new_job_id() -> str:
    return uuid.uuid4().hex


def route(runtime: str, settings: Settings) -> str:
    try:
        return settings.runtime_queues[runtime]
    except KeyError:
        served = ", ".join(sorted(settings.runtime_queues)) or "none"
        raise RoutingError(
            f"runtime {runtime!r} is not served by any queue (served here: {served})"
        ) from None


def build_record(
    job: JobCreate, job_id: str, settings: Settings, owner: str, **extra: Any
) -> dict[str, Any]:
    """The job's stored record: effective parameters after the task profile is applied."""
    profile = load_profiles(settings.profiles_file)[job.task_type]
    runtime = job.runtime or settings.default_runtime
    messages = (
        [m.model_dump() for m in job.messages]
        if job.messages
        else [{"role": "user", "content": job.prompt}]
    )
    if profile.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": profile.system_prompt})
    request = {
        "messages": messages,
        "model": job.model,
        "max_tokens": job.max_tokens or profile.max_tokens,
        "temperature": profile.temperature if job.temperature is None else job.temperature,
        "top_p": job.top_p or profile.top_p,
        "top_k": job.top_k or 0,
        "seed": job.seed,
        "stop": job.stop or [],
    }
    return {
        "id": job_id,
        "status": "queued",
        "created_at": time.time(),
        "task_type": job.task_type,
        "runtime": runtime,
        "queue": route(runtime, settings),
        "priority": job.priority,
        "owner": owner,
        "metadata": job.metadata,
        "request": request,
        "prompt_chars": sum(len(m["content"]) for m in messages),
        **{k: v for k, v in extra.items() if v is not None},
    }


def publish(record: dict[str, Any], show_content: bool, producer: Any = None) -> None:
    """Send the job to its queue (blocking; call from a thread). Flower sees only sizes."""
    summary = {
        "runtime": record["runtime"],
        "task_type": record["task_type"],
        "prompt_chars": record["prompt_chars"],
    }
    app.send_task(
        RUN_JOB,
        args=[record["id"], record],
        task_id=record["id"],
        queue=record["queue"],
        # kombu's Redis transport serves priority list 0 first; ours is 9 = most urgent.
        priority=9 - record["priority"],
        argsrepr=None if show_content else repr((record["id"],)),
        kwargsrepr=None if show_content else repr(summary),
        producer=producer,
    )
    JOBS_SUBMITTED.labels(record["runtime"]).inc()

