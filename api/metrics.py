"""Prometheus metrics of an API process, and the pure ASGI middleware timing requests.

Requests are labelled by route template (``/v1/jobs/{job_id}``), never by raw path, so a
job id can't become a label; paths no route matched share ``route="unmatched"``.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "reasonq_http_requests_total", "API requests answered.", ["method", "route", "status"]
)
REQUEST_SECONDS = Histogram(
    "reasonq_http_request_seconds",
    "API request latency, to the end of the response (streams included).",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30, 60),
)
JOBS_SUBMITTED = Counter("reasonq_jobs_submitted_total", "Jobs published.", ["runtime"])


class MetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # unless the app answers: it raised before starting a response

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], route, str(status)).inc()
            REQUEST_SECONDS.labels(scope["method"], route).observe(time.perf_counter() - began)
