"""Turning an accepted request into a job record: profile merge and routing.

The record is stored and its message pushed in one script (``JobStore.create`` with
``core.broker.task_message``), so a job is never left ``queued`` without a message that
will run it. The message carries the full record, so a worker never depends on the hash.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel

from api.schemas import JobCreate
from core.errors import RoutingError, UnsupportedByRuntime
from core.profiles import load_profiles
from core.settings import Settings


def new_job_id() -> str:
    return uuid.uuid4().hex


# Runtimes whose backend constrains decoding to JSON (vLLM's guided decoding, Ollama's
# ``format``) and parses tool calls; the in-worker ONNX decoder does neither.
JSON_OUTPUT_RUNTIMES = frozenset({"vllm", "ollama"})
TOOL_RUNTIMES = JSON_OUTPUT_RUNTIMES
# tool_choice values a runtime cannot honour: Ollama has no tool_choice, so it can't force one.
UNFORCEABLE_TOOLS = frozenset({"ollama"})


def route(job: JobCreate, settings: Settings) -> tuple[str, str]:
    """The job's (runtime, queue); ``RoutingError`` when no queue serves its runtime or the
    runtime cannot do what the job asks."""
    runtime = job.runtime or settings.default_runtime
    if job.json_output and runtime not in JSON_OUTPUT_RUNTIMES:
        raise UnsupportedByRuntime(
            f"runtime {runtime!r} cannot constrain output to JSON (response_format); "
            f"use one of: {', '.join(sorted(JSON_OUTPUT_RUNTIMES))}"
        )
    if job.uses_tools and runtime not in TOOL_RUNTIMES:
        raise UnsupportedByRuntime(
            f"runtime {runtime!r} cannot call tools (tools, tool messages); "
            f"use one of: {', '.join(sorted(TOOL_RUNTIMES))}"
        )
    if runtime in UNFORCEABLE_TOOLS and job.tool_choice not in (None, "auto", "none"):
        raise UnsupportedByRuntime(
            f"runtime {runtime!r} cannot force a tool call; use tool_choice auto or none"
        )
    return runtime, queue_of(runtime, settings)


def queue_of(runtime: str, settings: Settings) -> str:
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
    runtime, queue = route(job, settings)
    messages = (
        [m.model_dump(exclude_none=True) for m in job.messages]
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
        "response_format": job.json_output.model_dump(by_alias=True, exclude_none=True)
        if job.json_output
        else None,
    }
    if job.tools:  # only when given: records stay readable by workers that predate tools
        request["tools"] = [t.model_dump(exclude_none=True) for t in job.tools]
        choice = job.tool_choice
        request["tool_choice"] = choice.model_dump() if isinstance(choice, BaseModel) else choice
    return {
        "id": job_id,
        "status": "queued",
        "created_at": time.time(),
        "task_type": job.task_type,
        "runtime": runtime,
        "queue": queue,
        "priority": job.priority,
        "owner": owner,
        "metadata": job.metadata,
        "request": request,
        "prompt_chars": sum(len(m.get("content") or "") for m in messages),
        **{k: v for k, v in extra.items() if v is not None},
    }
