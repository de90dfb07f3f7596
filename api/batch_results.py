"""A batch's results as CSV or JSONL, in input order, streamed a chunk of rows at a time."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any

from core.batches import BatchStore
from core.rows import Format

RESULT_COLUMNS = (
    "index", "id", "status", "answer", "reasoning", "error", "prompt_tokens",
    "completion_tokens", "latency_s", "job_id",
)
"""One result row: ``id`` is the row's id column (else its index); ``reasoning`` is a
reasoning model's thinking (``result.reasoning``), empty for other models; ``latency_s`` runs
from enqueue to the job's end; ``error`` is the error's message (code and message in
JSONL)."""

CHUNK_ROWS = 500


def result_row(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row (``BatchStore.rows``) as one result record."""
    result, error = row.get("result"), row.get("error")
    usage = (result or {}).get("usage", {})
    created, finished = row.get("created_at"), row.get("finished_at")
    return {
        "index": row["index"],
        "id": row.get("batch_row_id") or str(row["index"]),
        "status": row["status"],
        "answer": result["text"] if result else None,
        "reasoning": result.get("reasoning") if result else None,
        "error": {"code": error["code"], "message": error["message"]} if error else None,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "latency_s": round(float(finished) - float(created), 3) if created and finished else None,
        "job_id": row.get("job_id"),
    }


def csv_lines(records: list[dict[str, Any]], header: bool) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow(RESULT_COLUMNS)
    for record in records:
        error = record["error"]
        record = {**record, "error": error["message"] if error else None}
        writer.writerow(["" if record[c] is None else record[c] for c in RESULT_COLUMNS])
    return out.getvalue().encode()


async def stream_results(
    batches: BatchStore, batch_id: str, rows: int, fmt: Format
) -> AsyncIterator[bytes]:
    """The first ``rows`` rows of the batch, as CSV (with a header) or JSON lines."""
    if fmt == "csv" and rows == 0:
        yield csv_lines([], header=True)
    for start in range(0, rows, CHUNK_ROWS):
        stored = await batches.rows(batch_id, start, min(start + CHUNK_ROWS, rows))
        records = [result_row(row) for row in stored]
        if fmt == "csv":
            yield csv_lines(records, header=start == 0)
        else:
            yield "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
