"""/v1/batches: upload a CSV or JSONL file of problems, follow it, read its results, cancel."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, UploadFile, status
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.batch_results import stream_results
from api.batch_schemas import BatchCreate, BatchInvalid, BatchPublic, RowProblem
from api.batches import ColumnRows, Ingest, enqueue_rows, first_errors, text_stream
from api.deps import BatchesDep, OwnerDep, SettingsDep
from api.limits import RateLimit
from api.routes.jobs import base_url
from api.schemas import ErrorResponse
from api.submission import new_job_id, queue_of
from core.batches import BatchStore
from core.errors import BatchNotFound
from core.public import batch_view
from core.rows import RowError, TableError, detect_format, read_rows
from core.webhooks import check_callback_url

router = APIRouter(prefix="/v1/batches", tags=["batches"])

NOT_FOUND = {404: {"model": ErrorResponse, "description": "Unknown batch"}}


def problems(errors: list[RowError]) -> list[RowProblem]:
    return [RowProblem(line=e.line, index=e.index, message=e.message) for e in errors]


def batch_public(record: dict[str, str], url: str, ingest: Ingest | None = None) -> BatchPublic:
    # The same view batch summary webhooks carry (core.public), so a callback and a GET agree.
    batch = BatchPublic.model_validate(batch_view(record, url, time.time()))
    if ingest:
        batch.rejected_rows = problems(ingest.rejected)
    return batch


async def read_batch(batches: BatchStore, batch_id: str, owner: str) -> dict[str, str]:
    record = await batches.get(batch_id)
    if record is None or record.get("owner") != owner:
        raise BatchNotFound(f"no batch {batch_id!r}")
    return record


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=BatchPublic,
    responses={422: {"model": BatchInvalid, "description": "Unreadable file or bad rows"}},
    dependencies=[RateLimit],  # one batch is one submission against the key's rate limit
)
async def create_batch(
    file: UploadFile,
    options: Annotated[BatchCreate, Form()],
    request: Request,
    settings: SettingsDep,
    batches: BatchesDep,
    owner: OwnerDep,
) -> BatchPublic | JSONResponse:
    """Enqueue one job per row of a CSV or JSONL file; answers once every row is enqueued.

    A bad row is refused with its line and reason while the others run, unless ``strict``:
    then the file is refused (422, listing the first bad lines) and nothing is enqueued.
    With a ``callback_url``, the batch's summary is POSTed there once its last job ended.
    """
    if options.runtime:
        queue_of(options.runtime, settings)
    callback_url = str(options.callback_url) if options.callback_url else None
    if callback_url:
        await check_callback_url(callback_url, settings)
    columns = options.column_map()
    to_job = ColumnRows(columns)
    try:
        fmt = detect_format(file.filename, options.format)
        with text_stream(file.file) as text:
            header, rows = read_rows(text, fmt)
            columns.check_header(header)
            errors = []
            if options.strict:  # a first pass over the whole file: all good, or nothing runs
                errors = await run_in_threadpool(first_errors, rows, to_job, settings)
    except TableError as exc:
        return JSONResponse({"detail": str(exc), "code": "invalid_file"}, status_code=422)
    if errors:
        invalid = BatchInvalid(
            detail=f"{len(errors)} bad row(s), nothing enqueued; first: {errors[0]}",
            errors=problems(errors),
        )
        return JSONResponse(invalid.model_dump(), status_code=422)
    batch_id = new_job_id()
    url = base_url(request, settings.public_url)
    fields = {"owner": owner, "filename": file.filename, "format": fmt, "kind": "reasonq"}
    if callback_url:
        # The API's URL as this client sees it: the batch links in the summary.
        fields.update(callback_url=callback_url, api_url=url)
    await batches.create(batch_id, fields)
    with text_stream(file.file) as text:
        _, rows = read_rows(text, fmt)
        ingest = await enqueue_rows(rows, to_job, batch_id, owner, batches, settings)
    return batch_public(await read_batch(batches, batch_id, owner), url, ingest)


@router.get("/{batch_id}", response_model=BatchPublic, responses=NOT_FOUND)
async def get_batch(
    batch_id: str, request: Request, settings: SettingsDep, batches: BatchesDep, owner: OwnerDep
) -> BatchPublic:
    """Counts by status, timestamps and throughput of a batch."""
    record = await read_batch(batches, batch_id, owner)
    return batch_public(record, base_url(request, settings.public_url))


@router.get("/{batch_id}/results", responses=NOT_FOUND)
async def get_results(
    batch_id: str,
    batches: BatchesDep,
    owner: OwnerDep,
    format: Annotated[
        str | None, Query(pattern="^(csv|jsonl)$", description="Default: the input's format.")
    ] = None,
) -> StreamingResponse:
    """One line per input row, in input order: id, status, answer, error, tokens, latency.
    Rows still queued or running read so; fetch again once the batch has finished."""
    record = await read_batch(batches, batch_id, owner)
    fmt = format or record["format"]
    rows = int(record.get("total") or int(record["submitted"]) + int(record["rejected"]))
    media = "text/csv" if fmt == "csv" else "application/x-ndjson"
    return StreamingResponse(
        stream_results(batches, batch_id, rows, fmt),  # type: ignore[arg-type]
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{batch_id}-results.{fmt}"'},
    )


@router.delete("/{batch_id}", response_model=BatchPublic, responses=NOT_FOUND)
async def cancel_batch(
    batch_id: str, request: Request, settings: SettingsDep, batches: BatchesDep, owner: OwnerDep
) -> BatchPublic:
    """Cancel every job of the batch that has not ended: queued ones never run, running
    ones stop at their next token. Finished rows keep their results."""
    await read_batch(batches, batch_id, owner)
    await batches.cancel(batch_id)
    record = await read_batch(batches, batch_id, owner)
    return batch_public(record, base_url(request, settings.public_url))
