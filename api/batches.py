"""Batch ingest: every row of an uploaded CSV or JSONL file becomes an ordinary job.

The upload is read as a stream (Starlette spools it to disk), ``CHUNK_ROWS`` rows at a
time: a worker thread parses and validates a chunk and builds its job records and their
messages; then one pipeline stores the jobs with their messages, the refused rows and the
counters. Memory stays flat whatever the file's length, and Redis sees one round trip per
chunk, not one per row.

Lenient mode keeps a bad row as ``rejected`` (with its line and reason) and goes on;
strict mode reads the whole file first and refuses it, enqueuing nothing, if any row is
bad.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, TextIO

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.metrics import JOBS_SUBMITTED
from api.schemas import JobCreate
from api.submission import build_record, route
from core.batches import BatchStore, batch_job_id
from core.broker import TaskMessage, task_message
from core.errors import RoutingError
from core.rows import ColumnMap, Row, RowError, TableError
from core.settings import Settings

log = logging.getLogger("reasonq.api")

CHUNK_ROWS = 500
"""Rows parsed and enqueued per round trip."""

MAX_REPORTED_ERRORS = 20
"""Row errors a strict refusal lists (the first ones, by line)."""

class RowConverter(Protocol):
    """How rows of one kind of file become jobs."""

    def row_id(self, row: Row) -> str:
        """The id results show for the row (the row's own, else its index)."""

    def job(self, row: Row) -> JobCreate:
        """The job the row asks for; raises ``RowError`` or ``ValidationError`` if bad."""


@dataclass
class ColumnRows:
    """Rows of a table whose columns ``ColumnMap`` maps to job fields."""

    columns: ColumnMap

    def row_id(self, row: Row) -> str:
        return self.columns.row_id(row)

    def job(self, row: Row) -> JobCreate:
        return JobCreate.model_validate(self.columns.job_fields(row))


class InvalidBatch(Exception):
    """Strict mode found bad rows (the first ``MAX_REPORTED_ERRORS``); nothing enqueued."""

    def __init__(self, errors: list[RowError]) -> None:
        super().__init__(f"{len(errors)} bad row(s), first {errors[0]}")
        self.errors = errors


@dataclass
class Ingest:
    """How ingest went: the first rows refused and a file-level error that ended it early."""

    rejected: list[RowError] = field(default_factory=list)
    error: str | None = None


@dataclass
class Chunk:
    """Rows taken in one go: job records and their messages, and refusals by row index;
    ``ended`` at the end of the file, ``error`` when a file-level problem ended it early."""

    records: list[dict[str, Any]] = field(default_factory=list)
    messages: list[TaskMessage] = field(default_factory=list)
    rejects: dict[int, dict[str, Any]] = field(default_factory=dict)
    ended: bool = True
    error: str | None = None


@contextmanager
def text_stream(binary: IO[bytes]) -> Iterator[TextIO]:
    """The upload as text from its start (a UTF-8 byte-order mark dropped). Detached on
    exit: closing the wrapper would close the upload, which strict mode reads twice."""
    binary.seek(0)
    text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")  # type: ignore[arg-type]
    try:
        yield text
    finally:
        text.detach()


def validation_reason(exc: ValidationError) -> str:
    """Field and reason of each error, never the value (it may be a whole prompt)."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']}" for e in exc.errors()
    )


def convert(row: Row, to_job: RowConverter, settings: Settings) -> tuple[JobCreate, str]:
    """The row's job, validated and routable, and its id; raises ``RowError`` if bad."""
    row_id = to_job.row_id(row)
    try:
        job = to_job.job(row)
        route(job, settings)
    except ValidationError as exc:
        raise RowError(row.index, row.line, validation_reason(exc), row_id) from None
    except (RoutingError, RowError) as exc:
        message = exc.message if isinstance(exc, RowError) else str(exc)
        raise RowError(row.index, row.line, message, row_id) from None
    return job, row_id


def first_errors(
    rows: Iterator[Row | RowError], to_job: RowConverter, settings: Settings
) -> list[RowError]:
    """Strict mode's first pass: read every row, keep the first errors (blocking)."""
    errors: list[RowError] = []
    for row in rows:
        try:
            if isinstance(row, RowError):
                raise row
            convert(row, to_job, settings)
        except RowError as exc:
            errors.append(exc)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    return errors


def _prepare_chunk(
    rows: Iterator[Row | RowError],
    to_job: RowConverter,
    batch_id: str,
    owner: str,
    settings: Settings,
) -> Chunk:
    """Up to ``CHUNK_ROWS`` rows and their jobs' messages (CPU-bound: runs in a thread)."""
    chunk = Chunk()
    try:
        _take_rows(rows, to_job, batch_id, owner, settings, chunk)
    except TableError as exc:
        chunk.error = str(exc)
    chunk.messages = [task_message(r, settings.flower_show_content) for r in chunk.records]
    return chunk


def _take_rows(
    rows: Iterator[Row | RowError],
    to_job: RowConverter,
    batch_id: str,
    owner: str,
    settings: Settings,
    chunk: Chunk,
) -> None:
    records, rejects = chunk.records, chunk.rejects
    for row in rows:
        try:
            if isinstance(row, RowError):
                raise row
            job, row_id = convert(row, to_job, settings)
            records.append(
                build_record(
                    job, batch_job_id(batch_id, row.index), settings, owner,
                    batch_id=batch_id, batch_index=row.index, batch_row_id=row_id,
                )
            )
        except RowError as exc:
            rejects[exc.index] = {"line": exc.line, "message": exc.message, "row_id": exc.row_id}
        if len(records) + len(rejects) >= CHUNK_ROWS:
            chunk.ended = False
            return


async def enqueue_rows(
    rows: Iterator[Row | RowError],
    to_job: RowConverter,
    batch_id: str,
    owner: str,
    batches: BatchStore,
    settings: Settings,
) -> Ingest:
    """Enqueue every good row and store every bad one, chunk by chunk, then seal the
    batch. A cancel stops ingest; a file-level error ends it (kept in ``ingest_error``)."""
    ingest = Ingest()
    try:
        while True:
            chunk = await run_in_threadpool(
                _prepare_chunk, rows, to_job, batch_id, owner, settings
            )
            if not await batches.add_rows(batch_id, chunk.records, chunk.messages, chunk.rejects):
                # Cancelled meanwhile: the canceller may have counted jobs before these.
                await batches.jobs.cancel_many([r["id"] for r in chunk.records])
                return ingest
            for record in chunk.records:
                JOBS_SUBMITTED.labels(record["runtime"]).inc()
            room = MAX_REPORTED_ERRORS - len(ingest.rejected)
            ingest.rejected += [
                RowError(i, r["line"], r["message"], r["row_id"])
                for i, r in list(chunk.rejects.items())[:room]
            ]
            if chunk.error:
                ingest.error = chunk.error
                await batches.set(batch_id, ingest_error=chunk.error)
                return ingest
            if chunk.ended:
                return ingest
    finally:
        # Sealed even when ingest failed (Redis lost mid-way): what was enqueued still runs
        # and the batch still finishes.
        try:
            await batches.seal(batch_id)
        except Exception:
            log.exception("batch %s: could not seal", batch_id)
