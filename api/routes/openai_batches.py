"""/openai/v1: the OpenAI Files and Batch endpoints, so the ``openai`` client runs batches.

    client = OpenAI(base_url="http://127.0.0.1:8000/openai/v1", api_key="...")
    f = client.files.create(file=open("requests.jsonl", "rb"), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
"""

from __future__ import annotations

import json
import time
from typing import Annotated

from fastapi import APIRouter, Form, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.batches import enqueue_rows, first_errors, text_stream
from api.deps import BatchesDep, OwnerDep, RedisDep, SettingsDep
from api.openai_batches import (
    ENDPOINT,
    OpenAIRows,
    batch_id_of,
    file_meta,
    output_file_id,
    save_upload,
    spooled_file,
    stream_file,
    stream_output,
)
from api.openai_schemas import (
    BatchCreateRequest,
    BatchError,
    BatchErrors,
    BatchObject,
    BatchRequestCounts,
    FileDeleted,
    FileObject,
)
from api.routes.batches import read_batch
from api.submission import new_job_id
from core import keys
from core.errors import BatchNotFound
from core.rows import TableError, read_rows

router = APIRouter(prefix="/openai/v1", tags=["openai"])


def invalid_request(message: str, param: str | None = None, status: int = 400) -> JSONResponse:
    """An error as OpenAI's clients expect it."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return JSONResponse({"error": error}, status_code=status)


def _int(value: str | None) -> int | None:
    return int(float(value)) if value else None


def batch_object(record: dict[str, str]) -> BatchObject:
    finished = _int(record.get("finished_at"))
    cancelling = _int(record.get("cancel_requested_at"))
    if "failed_at" in record:
        status = "failed"
    elif finished:
        status = "cancelled" if cancelling else "completed"
    elif cancelling:
        status = "cancelling"
    else:
        status = "in_progress" if "sealed_at" in record else "validating"
    errors = json.loads(record.get("errors", "null"))
    created = _int(record["created_at"]) or 0
    return BatchObject(
        id=f"batch_{record['id']}",
        endpoint=record["endpoint"],
        errors=BatchErrors(data=[BatchError(**e) for e in errors]) if errors else None,
        input_file_id=record["input_file_id"],
        completion_window=record["completion_window"],
        status=status,
        output_file_id=output_file_id(record["id"], "output"),
        error_file_id=output_file_id(record["id"], "errors"),
        created_at=created,
        in_progress_at=_int(record.get("sealed_at")) if status != "failed" else None,
        expires_at=created + 24 * 3600,
        finalizing_at=finished if status == "completed" else None,
        completed_at=finished if status == "completed" else None,
        failed_at=_int(record.get("failed_at")),
        cancelling_at=cancelling,
        cancelled_at=finished if status == "cancelled" else None,
        request_counts=BatchRequestCounts(
            total=int(record["submitted"]),
            completed=int(record["succeeded"]),
            failed=int(record["failed"]) + int(record["cancelled"]),
        ),
        metadata=json.loads(record.get("metadata", "null")),
    )


async def read_openai_batch(batches: BatchesDep, openai_id: str, owner: str) -> dict[str, str]:
    record = await read_batch(batches, batch_id_of(openai_id), owner)
    if record.get("kind") != "openai":
        raise BatchNotFound(f"no batch {openai_id!r}")
    return record


@router.post("/files", response_model=FileObject)
async def create_file(
    file: UploadFile,
    purpose: Annotated[str, Form()],
    redis: RedisDep,
    settings: SettingsDep,
    owner: OwnerDep,
) -> FileObject | JSONResponse:
    """Upload a batch input file (JSONL of chat completion requests)."""
    if purpose != "batch":
        return invalid_request("only purpose 'batch' is supported", "purpose")
    file_id = f"file-{new_job_id()}"
    meta = await save_upload(redis, file_id, file, purpose, settings.result_ttl_s)
    await redis.hset(keys.file(file_id), "owner", owner)
    return FileObject(**{**meta, "bytes": int(meta["bytes"]), "created_at": int(meta["created_at"])})


@router.get("/files/{file_id}", response_model=FileObject)
async def get_file(file_id: str, redis: RedisDep, owner: OwnerDep) -> FileObject | JSONResponse:
    meta = await file_meta(redis, file_id)
    if meta is None or meta.get("owner") != owner:
        return invalid_request(f"no file {file_id!r}", "file_id", 404)
    return FileObject(
        id=file_id, bytes=int(meta["bytes"]), created_at=int(meta["created_at"]),
        filename=meta["filename"], purpose=meta["purpose"],
    )


@router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, redis: RedisDep, owner: OwnerDep) -> FileDeleted | JSONResponse:
    """Delete a file now rather than when it expires (``REASONQ_RESULT_TTL_S``): an input
    file's bytes live in Redis. A batch already created from it is not affected; a
    batch's output or error file is only unlisted (its jobs keep the results)."""
    meta = await file_meta(redis, file_id)
    if meta is None or meta.get("owner") != owner:
        return invalid_request(f"no file {file_id!r}", "file_id", 404)
    await redis.delete(keys.file(file_id), keys.file_content(file_id))
    return FileDeleted(id=file_id)


@router.get("/files/{file_id}/content", response_model=None)
async def get_file_content(
    file_id: str, redis: RedisDep, batches: BatchesDep, owner: OwnerDep
) -> StreamingResponse | JSONResponse:
    """An input file as uploaded, or a batch's output or error file as of now."""
    meta = await file_meta(redis, file_id)
    if meta is None or meta.get("owner") != owner:
        return invalid_request(f"no file {file_id!r}", "file_id", 404)
    if meta["kind"] == "input":
        return StreamingResponse(stream_file(redis, file_id), media_type="application/jsonl")
    record = await read_batch(batches, meta["batch_id"], owner)
    rows = int(record.get("total") or record["submitted"])
    content = stream_output(batches, record["id"], rows, succeeded=meta["kind"] == "output")
    return StreamingResponse(content, media_type="application/jsonl")


@router.post("/batches", response_model=BatchObject)
async def create_batch(
    body: BatchCreateRequest,
    redis: RedisDep,
    batches: BatchesDep,
    settings: SettingsDep,
    owner: OwnerDep,
) -> BatchObject | JSONResponse:
    """Validate the input file (one bad line fails the batch, naming the line), then
    enqueue every request; answers once all are queued."""
    if body.endpoint != ENDPOINT:
        return invalid_request(f"only endpoint {ENDPOINT} is supported", "endpoint")
    meta = await file_meta(redis, body.input_file_id)
    if meta is None or meta.get("owner") != owner or meta["kind"] != "input":
        return invalid_request(f"no input file {body.input_file_id!r}", "input_file_id", 404)
    batch_id = new_job_id()
    await batches.create(batch_id, {
        "owner": owner, "kind": "openai", "filename": meta["filename"], "format": "jsonl",
        "input_file_id": body.input_file_id, "endpoint": body.endpoint,
        "completion_window": body.completion_window, "metadata": body.metadata,
    })
    for kind in ("output", "errors"):
        file_id = output_file_id(batch_id, kind)
        await redis.hset(keys.file(file_id), mapping={
            "id": file_id, "bytes": "0", "created_at": str(int(time.time())), "owner": owner,
            "filename": f"batch_{batch_id}_{kind}.jsonl", "purpose": "batch_output",
            "kind": kind, "batch_id": batch_id,
        })
        await redis.expire(keys.file(file_id), settings.result_ttl_s)
    async with spooled_file(redis, body.input_file_id) as spool:
        try:
            with text_stream(spool) as text:
                _, rows = read_rows(text, "jsonl")
                errors = await run_in_threadpool(
                    first_errors, rows, OpenAIRows(settings), settings
                )
            if not errors:
                with text_stream(spool) as text:
                    _, rows = read_rows(text, "jsonl")
                    await enqueue_rows(
                        rows, OpenAIRows(settings), batch_id, owner, batches, settings
                    )
        except TableError as exc:
            errors = [exc]
    if errors:
        # As at OpenAI, a file with a bad line fails the batch; nothing was enqueued.
        problems = [
            {"code": "invalid_request", "message": getattr(e, "message", str(e)),
             "line": getattr(e, "line", None)}
            for e in errors
        ]
        await batches.set(batch_id, failed_at=time.time(), errors=problems)
        await batches.seal(batch_id)
    return batch_object(await read_batch(batches, batch_id, owner))


@router.get("/batches/{batch_id}", response_model=BatchObject)
async def get_batch(batch_id: str, batches: BatchesDep, owner: OwnerDep) -> BatchObject:
    return batch_object(await read_openai_batch(batches, batch_id, owner))


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject)
async def cancel_batch(batch_id: str, batches: BatchesDep, owner: OwnerDep) -> BatchObject:
    """Requests not yet run are cancelled; the batch reads ``cancelling`` until the
    running ones stop, then ``cancelled``."""
    record = await read_openai_batch(batches, batch_id, owner)
    await batches.cancel(record["id"])
    return batch_object(await read_openai_batch(batches, batch_id, owner))
