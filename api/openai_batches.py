"""OpenAI Batch API on top of reasonq batches: files, request lines, output lines.

An uploaded file is kept in Redis (``keys.file_content``, appended a megabyte at a time,
read back the same way), so any API process can ingest it. A batch's request lines go
through the ordinary batch ingest (``api.batches``), strictly: as at OpenAI, one invalid
line fails the whole batch with the line named. Output and error files are not stored:
they are written from the batch's jobs when read.

Models: ``default`` is the configured default runtime and its model; ``vllm``,
``ollama`` or ``onnx`` is that runtime's default model; ``<runtime>/<model>`` picks both;
any other name is a model of the default runtime.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import redis.asyncio as aioredis
from fastapi import UploadFile

from api.schemas import JobCreate
from core import keys
from core.batches import BatchStore
from core.jobs import decode
from core.rows import Row, RowError
from core.settings import Settings

ENDPOINT = "/v1/chat/completions"
BLOCK = 1 << 20
"""Bytes moved to or from Redis per command."""

RUNTIMES = ("vllm", "ollama", "onnx")
SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop")
PASSED = ("response_format", "tools", "tool_choice")  # validated by JobCreate
IGNORED = frozenset({"user", "store", "metadata", "service_tier", "n", "stream"})
"""Body fields accepted and ignored (``n`` and ``stream`` only at their defaults)."""


def batch_id_of(openai_id: str) -> str:
    return openai_id.removeprefix("batch_")


def output_file_id(batch_id: str, kind: str) -> str:
    return f"file-{batch_id}-{kind}"


async def save_upload(
    redis: aioredis.Redis, file_id: str, upload: UploadFile, purpose: str, ttl: int
) -> dict[str, str]:
    """Store an uploaded file; its description (``keys.file``) as a dict of strings."""
    content = keys.file_content(file_id)
    size = 0
    await redis.delete(content)
    while block := await upload.read(BLOCK):
        await redis.append(content, block)
        size += len(block)
    meta = {
        "id": file_id, "bytes": str(size), "created_at": str(int(time.time())),
        "filename": upload.filename or "upload.jsonl", "purpose": purpose, "kind": "input",
    }
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hset(keys.file(file_id), mapping=meta)
        pipe.expire(keys.file(file_id), ttl)
        pipe.expire(content, ttl)
        await pipe.execute()
    return meta


async def file_meta(redis: aioredis.Redis, file_id: str) -> dict[str, str] | None:
    meta = await redis.hgetall(keys.file(file_id))
    return decode(meta) if meta else None


@asynccontextmanager
async def spooled_file(redis: aioredis.Redis, file_id: str) -> AsyncIterator[IO[bytes]]:
    """A stored file's bytes in a temporary file (on disk past a few megabytes)."""
    with tempfile.SpooledTemporaryFile(max_size=8 * BLOCK) as spool:
        async for block in stream_file(redis, file_id):
            spool.write(block)
        yield spool


async def stream_file(redis: aioredis.Redis, file_id: str) -> AsyncIterator[bytes]:
    offset = 0
    while block := await redis.getrange(keys.file_content(file_id), offset, offset + BLOCK - 1):
        yield block
        offset += len(block)


def resolve_model(name: str | None, settings: Settings) -> tuple[str | None, str | None]:
    """(runtime, model) for an OpenAI ``model`` name; None = the configured default."""
    if not name or name == "default":
        return None, None
    if name in RUNTIMES:
        return name, None
    runtime, _, model = name.partition("/")
    if runtime in RUNTIMES and model:
        return runtime, model
    return None, name


class BadLine(ValueError):
    """A request line that is not a supported chat completion request."""


def _message(message: dict[str, Any], index: int) -> dict[str, Any]:
    """A request line's chat message as a job's (``developer`` is ``system`` here)."""
    role = message.get("role")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role}
    if message.get("content") is not None or not message.get("tool_calls"):
        out["content"] = _text(message.get("content"), index)
    out |= {k: message[k] for k in ("tool_calls", "tool_call_id") if message.get(k) is not None}
    return out


def _text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in content
    ):
        return "".join(str(p.get("text", "")) for p in content)
    raise BadLine(f"body.messages.{index}.content: only text content is supported")


@dataclass
class OpenAIRows:
    """Request lines of an OpenAI batch file -> jobs; ``custom_id`` must be unique."""

    settings: Settings
    seen: set[str] = field(default_factory=set)

    def row_id(self, row: Row) -> str:
        return str(row.values.get("custom_id") or row.index)

    def job(self, row: Row) -> JobCreate:
        try:
            return self._job(row.values)
        except BadLine as exc:
            raise RowError(row.index, row.line, str(exc)) from None

    def _job(self, line: dict[str, Any]) -> JobCreate:
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise BadLine("custom_id: a non-empty string is required")
        if custom_id in self.seen:
            raise BadLine(f"custom_id {custom_id!r} is used by an earlier line")
        self.seen.add(custom_id)
        if line.get("method", "POST") != "POST" or line.get("url") != ENDPOINT:
            raise BadLine(f"method and url must be POST {ENDPOINT}")
        body = line.get("body")
        if not isinstance(body, dict):
            raise BadLine("body: a JSON object is required")
        known = {"model", "messages", "max_tokens", "max_completion_tokens", *PASSED, *SAMPLING}
        unsupported = sorted(set(body) - known - IGNORED)
        if unsupported:
            raise BadLine(f"body: unsupported field(s) {', '.join(unsupported)}")
        if body.get("n", 1) != 1 or body.get("stream"):
            raise BadLine("body: n must be 1 and stream false")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise BadLine("body.messages: a list is required")
        runtime, model = resolve_model(body.get("model"), self.settings)
        return JobCreate.model_validate({
            "messages": [_message(m, i) for i, m in enumerate(messages) if isinstance(m, dict)]
            or None,
            "runtime": runtime,
            "model": model,
            "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens"),
            "priority": self.settings.batch_priority,
            **{k: body[k] for k in (*PASSED, *SAMPLING) if body.get(k) is not None},
        })


def output_line(row: dict[str, Any]) -> dict[str, Any]:
    """One line of the output file (a succeeded row) or of the error file (any other)."""
    job_id = row.get("job_id") or f"{row['index']}"
    line: dict[str, Any] = {
        "id": f"batch_req_{job_id}", "custom_id": row.get("batch_row_id"),
        "response": None, "error": None,
    }
    result = row.get("result")
    if row["status"] == "succeeded" and result:
        usage = result["usage"]
        calls = result.get("tool_calls")
        line["response"] = {
            "status_code": 200,
            "request_id": job_id,
            "body": {
                "id": f"chatcmpl-{job_id}",
                "object": "chat.completion",
                "created": int(float(row.get("finished_at") or time.time())),
                "model": result["model"],
                "choices": [{
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None if calls and not result["text"] else result["text"],
                        **({"tool_calls": calls} if calls else {}),
                        # As vLLM's reasoning parsers name it.
                        **({"reasoning": result["reasoning"]} if result.get("reasoning") else {}),
                    },
                    "logprobs": None,
                    "finish_reason": result["finish_reason"]
                    if result["finish_reason"] in ("length", "tool_calls")
                    else "stop",
                }],
                "usage": {**usage, "total_tokens": sum(usage.values())},
            },
        }
    else:
        error = row.get("error") or {"code": row["status"], "message": f"request {row['status']}"}
        line["error"] = {"code": error["code"], "message": error["message"]}
    return line


async def stream_output(
    batches: BatchStore, batch_id: str, rows: int, succeeded: bool
) -> AsyncIterator[bytes]:
    """The output (``succeeded``) or error file of a batch, from its jobs, in input order.
    Rows still queued or running appear in neither."""
    for start in range(0, rows, 500):
        stored = await batches.rows(batch_id, start, min(start + 500, rows))
        lines = [
            json.dumps(output_line(row), ensure_ascii=False) + "\n"
            for row in stored
            if row["status"] not in ("queued", "running", "missing")
            and (row["status"] == "succeeded") == succeeded
        ]
        if lines:
            yield "".join(lines).encode()
