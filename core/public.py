"""The public views of a job and a batch: the JSON ``GET /v1/jobs/{id}`` and
``GET /v1/batches/{id}`` answer and webhooks carry.

Pure functions of the stored hashes (``core.jobs``, ``core.batches``), shared by the API
and the workers, which never import API code. Timestamps are rendered as the API's models
write them (ISO 8601, UTC, ``Z``), so a webhook body and a ``GET`` of the same job (or
batch) match.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any


def iso(value: str | float | None) -> str | None:
    """A stored unix time as ISO 8601 in UTC; ``None`` stays ``None``."""
    if value is None or value == "":
        return None
    return datetime.fromtimestamp(float(value), UTC).isoformat().replace("+00:00", "Z")


def job_view(record: dict[str, str], base_url: str) -> dict[str, Any]:
    """The job as its owner sees it; ``base_url`` is the API's URL, for the job's link."""
    return {
        "id": record["id"],
        "url": f"{base_url}/v1/jobs/{record['id']}",
        "status": record["status"],
        "task_type": record["task_type"],
        "runtime": record["runtime"],
        "queue": record["queue"],
        "priority": int(record["priority"]),
        "metadata": json.loads(record.get("metadata", "{}")),
        "created_at": iso(record["created_at"]),
        "started_at": iso(record.get("started_at")),
        "finished_at": iso(record.get("finished_at")),
        "attempts": int(record.get("attempts", 0)),
        "result": json.loads(record["result"]) if "result" in record else None,
        "error": json.loads(record["error"]) if "error" in record else None,
        "webhook": webhook_view(record),
    }


BATCH_COUNTERS = ("submitted", "rejected", "running", "succeeded", "failed", "cancelled")


def batch_status(record: dict[str, str]) -> str:
    """ingesting, in_progress, cancelling, completed or cancelled."""
    if "finished_at" in record:
        # A cancel that came after the last job ended changed nothing.
        cancelled_first = float(record.get("cancel_requested_at", "inf")) <= float(
            record["finished_at"]
        )
        return "cancelled" if cancelled_first else "completed"
    if "cancel_requested_at" in record:
        return "cancelling"
    return "in_progress" if "sealed_at" in record else "ingesting"


def batch_view(record: dict[str, str], base_url: str, now: float) -> dict[str, Any]:
    """The batch as its owner sees it; ``now`` is when, for the throughput of a batch that
    has not finished (a finished one's is fixed at its end)."""
    n = {name: int(record.get(name, 0)) for name in BATCH_COUNTERS}
    ended = n["succeeded"] + n["failed"] + n["cancelled"]
    created = float(record["created_at"])
    elapsed = float(record.get("finished_at") or now) - created
    batch_url = f"{base_url}/v1/batches/{record['id']}"
    return {
        "id": record["id"],
        "url": batch_url,
        "results_url": f"{batch_url}/results",
        "status": batch_status(record),
        "filename": record.get("filename"),
        "format": record["format"],
        "counts": {
            "total": int(record["total"]) if "total" in record else None,
            **n,
            "queued": n["submitted"] - n["running"] - ended,
        },
        "created_at": iso(record["created_at"]),
        "ingested_at": iso(record.get("sealed_at")),
        "finished_at": iso(record.get("finished_at")),
        "cancel_requested_at": iso(record.get("cancel_requested_at")),
        "jobs_per_s": round(ended / elapsed, 3) if elapsed > 0 else None,
        "ingest_error": record.get("ingest_error"),
        # Listed only in the answer to the upload, which has them at hand.
        "rejected_rows": [],
        "webhook": webhook_view(record),
    }


def webhook_view(record: dict[str, str]) -> dict[str, Any] | None:
    """Delivery state of the job's (or batch's) ``callback_url``; ``None`` without one.

    The delivery queue (``core.webhooks``) mirrors its state into the hash's ``webhook``
    field; until the job (batch) ends there is none, and the delivery reads as pending.
    """
    if "callback_url" not in record:
        return None
    state = json.loads(record["webhook"]) if "webhook" in record else {}
    return {
        "url": record["callback_url"],
        "status": state.get("status", "pending"),
        "attempts": int(state.get("attempts", 0)),
        "last_status": state.get("last_status"),
        "last_error": state.get("last_error"),
        "delivered_at": iso(state.get("delivered_at")),
        "next_attempt_at": iso(state.get("next_attempt_at")),
    }
