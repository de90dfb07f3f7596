"""What the HTTP runtimes' tests share."""

from __future__ import annotations

from runtimes.base import GenerationRequest
from runtimes.http import HTTPOptions

FAST = HTTPOptions(read_timeout_s=5, cancel_poll_s=0.02)


def ask(text: str, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], **kwargs)  # type: ignore[arg-type]
