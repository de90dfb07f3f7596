"""Prometheus metrics of a worker process, served on ``REASONQ_WORKER_METRICS_PORT``.

Labels stay low in cardinality: runtime, status, error code, never a job id.
"""

from __future__ import annotations

import socket

from prometheus_client import Counter, Histogram, start_http_server

from runtimes.base import Completion

HOSTNAME = socket.gethostname()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

JOBS = Counter("reasonq_jobs_total", "Jobs finished, by final status.", ["status", "runtime"])
QUEUE_WAIT = Histogram(
    "reasonq_queue_wait_seconds", "Time from submission to start.", ["runtime"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "reasonq_time_to_first_token_seconds", "Backend time to first token.", ["runtime"],
    buckets=_LATENCY_BUCKETS,
)
RUN_SECONDS = Histogram(
    "reasonq_run_seconds", "Time from start to end of a job.", ["runtime"],
    buckets=_LATENCY_BUCKETS,
)
TOKENS = Counter("reasonq_tokens_generated_total", "Completion tokens generated.", ["runtime"])
BACKEND_ERRORS = Counter(
    "reasonq_backend_errors_total", "Failed backend calls, by error code.", ["runtime", "code"]
)
RETRIES = Counter("reasonq_retries_total", "Backend calls retried after an error.", ["runtime"])


def observe_completion(runtime: str, completion: Completion, run_s: float) -> None:
    if completion.time_to_first_token_s is not None:
        TIME_TO_FIRST_TOKEN.labels(runtime).observe(completion.time_to_first_token_s)
    RUN_SECONDS.labels(runtime).observe(run_s)
    TOKENS.labels(runtime).inc(completion.completion_tokens)


def serve(port: int, tries: int = 20) -> int | None:
    """Serve metrics on ``port`` or the next free one (several workers may share a host)."""
    if not port:
        return None
    for candidate in range(port, port + tries):
        try:
            start_http_server(candidate)
            return candidate
        except OSError:
            continue
    return None
