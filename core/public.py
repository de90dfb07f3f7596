"""The public view of a job: the JSON ``GET /v1/jobs/{id}`` answers and webhooks carry.

A pure function of the stored job hash (``core.jobs``), shared by the API and the workers,
which never import API code. Timestamps are rendered as the API's models write them
(ISO 8601, UTC, ``Z``), so a webhook body and a ``GET`` of the same job match.
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


def webhook_view(record: dict[str, str]) -> dict[str, Any] | None:
    """Delivery state of the job's ``callback_url``; ``None`` for a job without one.

    The delivery queue (``core.webhooks``) mirrors its state into the job's ``webhook``
    field; until the job ends there is none, and the delivery reads as pending.
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
