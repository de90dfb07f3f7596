"""What the HTTP runtimes' tests share."""

from __future__ import annotations

from runtimes.base import GenerationRequest
from runtimes.http import HTTPOptions

FAST = HTTPOptions(read_timeout_s=5, cancel_poll_s=0.02)


def ask(text: str, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], **kwargs)  # type: ignore[arg-type]


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
    "required": ["answer", "confidence"],
}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA},
}
