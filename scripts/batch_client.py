"""The HTTP side of ``reasonq-submit``: submit one row as a job and wait for its end.

One ``httpx.AsyncClient`` for every row. Each row is posted with an ``Idempotency-Key``
derived from the file and the row, so a rerun after a crash gets the job it already
created (``Idempotent-Replayed``) instead of a second one; then the job is long-polled
(``GET /v1/jobs/{id}?wait=``) until it ends. 429, 5xx and network errors are retried
with exponential backoff and jitter (``Retry-After`` honoured); other 4xx are the row's
own fault and end it as ``rejected``.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}


class RowRejected(Exception):
    """The API refused the row (4xx other than 429); the message is its reason."""


@dataclass
class Retry:
    """Tries per request and the backoff between them."""

    attempts: int = 8
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.backoff_max_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
        try:
            return max(delay, float(retry_after)) if retry_after else delay
        except ValueError:  # an HTTP date: rare enough to fall back on our own backoff
            return delay


class RateLimiter:
    """At most ``per_s`` acquisitions a second, evenly spaced (0 = unlimited)."""

    def __init__(self, per_s: float) -> None:
        self.interval = 1.0 / per_s if per_s > 0 else 0.0
        self.next_at = 0.0

    async def acquire(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        at = max(now, self.next_at)
        self.next_at = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)


class JobClient:
    """Submits rows as jobs and waits for them, over one connection pool."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        retry: Retry,
        limiter: RateLimiter,
        wait_s: float = 30.0,
    ) -> None:
        self.client, self.retry, self.limiter, self.wait_s = client, retry, limiter, wait_s

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """The response, once it is neither 429, 5xx nor a network error (retried)."""
        for attempt in range(self.retry.attempts):
            retry_after = None
            try:
                response = await self.client.request(method, url, **kwargs)
            except httpx.TransportError:
                if attempt == self.retry.attempts - 1:
                    raise
            else:
                if response.status_code != 429 and response.status_code < 500:
                    return response
                if attempt == self.retry.attempts - 1:
                    response.raise_for_status()
                retry_after = response.headers.get("Retry-After")
            await asyncio.sleep(self.retry.delay(attempt, retry_after))
        raise AssertionError("unreachable")

    async def submit(self, body: dict[str, Any], key: str) -> dict[str, Any]:
        """Create the job (or find the one this key already created)."""
        await self.limiter.acquire()
        response = await self.request(
            "POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}
        )
        if response.status_code >= 400:
            raise RowRejected(_reason(response))
        return response.json()

    async def wait(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job once it has ended, long-polling rather than polling tightly."""
        while job["status"] not in TERMINAL:
            response = await self.request(
                "GET", f"/v1/jobs/{job['id']}", params={"wait": self.wait_s}
            )
            if response.status_code >= 400:
                raise RowRejected(_reason(response))
            job = response.json()
        return job


def _reason(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list):  # FastAPI validation errors: field and message each
        detail = "; ".join(
            f"{'.'.join(map(str, e.get('loc', [])[1:])) or 'body'}: {e.get('msg')}"
            for e in detail
        )
    return f"HTTP {response.status_code}: {detail}"
