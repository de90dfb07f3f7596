"""The wire protocol of the batch API: pydantic models only, no serving logic."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, HttpUrl, Json

from api.schemas import ResponseFormat, RuntimeName, TaskType, WebhookPublic
from core.rows import JOB_FIELDS, ColumnMap
from core.settings import settings

BatchStatusName = Literal["ingesting", "in_progress", "cancelling", "completed", "cancelled"]


class BatchCreate(BaseModel):
    """Form fields of ``POST /v1/batches`` (the file comes as the ``file`` part).

    ``*_column`` names the column holding that job field per row; the plain field is the
    default for rows whose cell is empty (or that have no such column).
    """

    format: Literal["csv", "jsonl"] | None = Field(
        None, description="Omitted: from the file name (.jsonl/.ndjson = JSONL, else CSV)."
    )
    prompt_column: str = Field("prompt", min_length=1)
    id_column: str | None = Field(None, description="Echoed in results; else the row index.")
    strict: bool = Field(False, description="Refuse the whole file (422) if any row is bad.")

    task_type_column: str | None = None
    runtime_column: str | None = None
    model_column: str | None = None
    max_tokens_column: str | None = None
    temperature_column: str | None = None
    top_p_column: str | None = None
    top_k_column: str | None = None
    seed_column: str | None = None
    stop_column: str | None = None
    priority_column: str | None = None
    response_format_column: str | None = Field(None, description="Cells of JSON text.")

    task_type: TaskType = "chat"
    runtime: RuntimeName | None = None
    model: str | None = Field(None, min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=settings.max_tokens_limit)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | None = Field(None, min_length=1, max_length=128)
    response_format: Json[ResponseFormat] | None = Field(
        None, description='JSON text, as the job field: {"type": "json_object"} or a json_schema.'
    )
    priority: int = Field(
        settings.batch_priority, ge=0, le=9, description="Default: below interactive jobs."
    )
    callback_url: HttpUrl | None = Field(
        None,
        max_length=2048,
        description="POSTed the batch's summary, signed, once its last job ended "
        "(docs/webhooks.md). Must be a public address unless the server allow-lists it.",
    )

    def column_map(self) -> ColumnMap:
        data = self.model_dump(by_alias=True)
        return ColumnMap(
            prompt=self.prompt_column,
            id=self.id_column,
            columns={f: data[f"{f}_column"] for f in JOB_FIELDS if data[f"{f}_column"]},
            defaults={f: data[f] for f in JOB_FIELDS},
        )


class BatchCounts(BaseModel):
    """Rows by state. ``total`` is known once ingest has read the whole file."""

    total: int | None
    submitted: int
    rejected: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


class RowProblem(BaseModel):
    line: int = Field(description="1-based line of the file where the row starts.")
    index: int = Field(description="0-based data row.")
    message: str


class BatchPublic(BaseModel):
    id: str
    url: str
    results_url: str
    status: BatchStatusName
    filename: str | None
    format: str
    counts: BatchCounts
    created_at: datetime
    ingested_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    jobs_per_s: float | None = Field(None, description="Rows ended per second since creation.")
    ingest_error: str | None = Field(None, description="A file-level error that ended ingest.")
    rejected_rows: list[RowProblem] = Field(
        default_factory=list, description="On creation: the first rows refused, and why."
    )
    webhook: WebhookPublic | None = Field(
        None, description="Delivery of the batch's callback_url summary; null without one."
    )


class BatchInvalid(BaseModel):
    """A strict batch refused: nothing was enqueued."""

    detail: str
    code: Literal["invalid_batch"] = "invalid_batch"
    errors: list[RowProblem]
