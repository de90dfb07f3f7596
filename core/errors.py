"""The exceptions reasonq raises, in one place.

    ReasonqError
    ├── JobNotFound              unknown job id (API answers 404)
    │   └── BatchNotFound        unknown batch id (404)
    ├── RoutingError             no queue serves the requested runtime (API answers 422)
    ├── IdempotencyConflict      an Idempotency-Key reused for another request (409)
    ├── CallbackRefused          a callback_url that may not be called, e.g. private (422)
    ├── TooManyRequests          429 with Retry-After
    │   ├── RateLimited          an API key's submission rate exceeded
    │   └── QuotaExceeded        an API key's queued + running jobs at its limit
    └── BackendError             a runtime could not produce a completion
        ├── BackendUnavailable   connection refused, timeout, 5xx: retried with backoff
        │   └── BackendBusy      429 / Ollama's 503 "server busy": retried, never counted as a crash
        └── BackendRejected      4xx (unknown model, context too long): failed at once
            └── ContextTooLong   the prompt does not fit the model's context

Workers retry only ``BackendUnavailable`` (and so ``BackendBusy``); everything else ends the job.
"""

from __future__ import annotations

import redis.exceptions


class ReasonqError(Exception):
    """Root of every reasonq error; ``code`` is the stable, machine-readable name."""

    code = "internal_error"
    retryable = False


class JobNotFound(ReasonqError):
    code = "job_not_found"


class BatchNotFound(JobNotFound):
    """An unknown batch id; answered 404 like an unknown job."""

    code = "batch_not_found"


class RoutingError(ReasonqError):
    code = "runtime_not_served"


class UnsupportedByRuntime(RoutingError):
    """The job asks for something its runtime cannot do (JSON output from the ONNX decoder)."""

    code = "unsupported_by_runtime"


class IdempotencyConflict(ReasonqError):
    code = "idempotency_conflict"


class CallbackRefused(ReasonqError):
    code = "callback_url_refused"


class TooManyRequests(ReasonqError):
    """The caller must slow down; ``retry_after_s`` becomes the Retry-After header."""

    code = "too_many_requests"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(TooManyRequests):
    code = "rate_limited"


class QuotaExceeded(TooManyRequests):
    code = "quota_exceeded"


class BackendError(ReasonqError):
    code = "backend_error"

    def __init__(
        self, message: str, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code  # the backend's HTTP status, when it answered
        self.retry_after = retry_after  # seconds the backend asked us to wait (Retry-After)


class BackendUnavailable(BackendError):
    code = "backend_unavailable"
    retryable = True


class BackendBusy(BackendUnavailable):
    code = "backend_busy"


class BackendRejected(BackendError):
    code = "backend_rejected"


class ContextTooLong(BackendRejected):
    code = "context_too_long"


# Not ours: Redis unreachable (restarting, a connection that went silent), full
# (maxmemory) or read-only (a primary demoted by a failover, until the URL reaches the new
# one). Either way a write may succeed later, so workers retry or wait instead of failing
# the job, and log a line rather than a traceback.
REDIS_UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)
