"""What the two HTTP runtimes share: the pooled client, error mapping, streaming and cancel.

Every httpx exception and HTTP error status is mapped to ``core.errors`` here and nowhere
else (as httpx maps httpcore's errors once, in ``map_httpcore_exceptions``):

    connect error, timeout, dropped connection, 5xx   -> BackendUnavailable
    429, 503 (Ollama's "server busy")                 -> BackendBusy, with ``retry_after``
    other 4xx                                         -> BackendRejected, the backend's message
    4xx about the context length                      -> ContextTooLong

Mapped errors carry ``status_code: int | None`` and ``retry_after: float | None``. Retrying
with backoff is the worker's job; the one retry done here is for a pooled keep-alive
connection that the server had already closed when the request went out.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from core.errors import (
    BackendBusy,
    BackendError,
    BackendRejected,
    BackendUnavailable,
    ContextTooLong,
)
from core.settings import Settings
from runtimes.base import CancelCheck, Completion, FinishReason, GenerationRequest, TokenCallback
from runtimes.transport import StreamTransport

log = logging.getLogger(__name__)

_CONTEXT_ERROR = re.compile(r"context length|context window|context_length_exceeded", re.IGNORECASE)


@dataclass(frozen=True)
class HTTPOptions:
    """Client tuning shared by the HTTP runtimes; ``from_settings`` reads ``REASONQ_HTTP_*``."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0
    keepalive_expiry_s: float = 4.0
    max_keepalive_connections: int = 64
    cancel_poll_s: float = 0.25

    @classmethod
    def from_settings(cls, settings: Settings) -> HTTPOptions:
        return cls(
            connect_timeout_s=settings.http_connect_timeout_s,
            read_timeout_s=settings.http_read_timeout_s,
            keepalive_expiry_s=settings.http_keepalive_expiry_s,
            max_keepalive_connections=settings.worker_concurrency,
            cancel_poll_s=settings.http_cancel_poll_s,
        )


def make_client(
    base_url: str, options: HTTPOptions, headers: Mapping[str, str] | None = None
) -> httpx.AsyncClient:
    """One pooled client per worker event loop, reused by every job of that loop.

    No cap on connections: the worker's semaphores bound generations in flight, and a cap
    here would queue requests invisibly. Idle connections expire before the backend's own
    idle timeout so we rarely reuse one the server is closing.
    """
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(options.read_timeout_s, connect=options.connect_timeout_s),
        transport=StreamTransport(
            keepalive_expiry_s=options.keepalive_expiry_s,
            max_keepalive_connections=options.max_keepalive_connections,
        ),
    )


# --- error mapping -----------------------------------------------------------------------
def _tagged(exc: BackendError, status: int | None, retry_after: float | None = None) -> Any:
    exc.status_code = status
    exc.retry_after = retry_after
    return exc


def backend_message(body: bytes) -> str:
    """The human message in an error body: OpenAI ``{"error": {"message"}}``, vLLM's older
    ``{"object": "error", "message"}``, Ollama ``{"error": "..."}``, else the raw text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:1000]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        for value in (error, data.get("message"), data.get("detail")):
            if isinstance(value, str):
                return value
    return text[:1000]


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_for_status(backend: str, response: httpx.Response) -> BackendError:
    """The error for an HTTP error answer whose body has been read."""
    status = response.status_code
    message = backend_message(response.content) or response.reason_phrase
    text = f"{backend} answered {status}: {message}"
    if status in (429, 503):
        retry_after = retry_after_s(response.headers.get("retry-after"))
        return _tagged(BackendBusy(text), status, retry_after)
    if status >= 500 or status == 408:
        return _tagged(BackendUnavailable(text), status)
    if _CONTEXT_ERROR.search(message):
        return _tagged(ContextTooLong(text), status)
    return _tagged(BackendRejected(text), status)


def error_in_stream(backend: str, message: str, code: Any = None) -> BackendError:
    """An error the backend reported inside a 200 stream (vLLM SSE / Ollama NDJSON)."""
    text = f"{backend} failed mid-stream: {message}"
    status = code if isinstance(code, int) else None
    if _CONTEXT_ERROR.search(message):
        return _tagged(ContextTooLong(text), status)
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return _tagged(BackendRejected(text), status)
    return _tagged(BackendUnavailable(text), status)


def error_for_transport(backend: str, exc: httpx.HTTPError) -> BackendError:
    """Timeouts and network failures are transient; a bad URL or protocol is not."""
    text = f"{backend}: {type(exc).__name__}: {exc or 'no detail'}"
    if isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError):
        return _tagged(BackendUnavailable(text), None)
    return _tagged(BackendError(text), None)


# --- request bodies ----------------------------------------------------------------------
def optional_sampling(request: GenerationRequest) -> dict[str, Any]:
    """``top_k``, ``seed`` and ``stop``, only those set: vLLM and Ollama name them alike
    (vLLM at the top level of its body, Ollama in ``options``)."""
    fields: dict[str, Any] = {}
    if request.top_k > 0:
        fields["top_k"] = request.top_k
    if request.seed is not None:
        fields["seed"] = request.seed
    if request.stop:
        fields["stop"] = list(request.stop)
    return fields


# --- streaming ---------------------------------------------------------------------------
_STALE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
"""What sending on a keep-alive connection the server has just closed raises."""


async def _send(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    try:
        return await client.send(request, stream=True)
    except _STALE as exc:
        # No response byte came back, so the server did not act on it: the pooled
        # connection was closed under us (idle timeout race). Retry once, at once.
        log.debug("retrying %s %s on a fresh connection: %r", request.method, request.url, exc)
        return await client.send(request, stream=True)


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, backend: str, path: str, payload: dict[str, Any]
) -> AsyncIterator[httpx.Response]:
    """POST ``payload`` and yield the streaming 200 response; every failure is mapped."""
    try:
        response = await _send(client, client.build_request("POST", path, json=payload))
    except httpx.HTTPError as exc:
        raise error_for_transport(backend, exc) from exc
    try:
        if response.status_code >= 400:
            await response.aread()
            raise error_for_status(backend, response)
        yield response
    except httpx.HTTPError as exc:
        raise error_for_transport(backend, exc) from exc
    finally:
        await response.aclose()  # unread body: httpx closes the connection, the server aborts


async def get_json(client: httpx.AsyncClient, backend: str, path: str) -> Any:
    """GET a small JSON document with the same error mapping as generations."""
    try:
        try:
            response = await client.get(path)
        except _STALE:
            response = await client.get(path)
    except httpx.HTTPError as exc:
        raise error_for_transport(backend, exc) from exc
    if response.status_code >= 400:
        raise error_for_status(backend, response)
    return response.json()


# --- cancellation ------------------------------------------------------------------------
class GenerationCancelled(Exception):
    """Internal: the job was cancelled; ``HTTPRuntime.generate`` turns it into a Completion."""


@asynccontextmanager
async def cancel_watch(is_cancelled: CancelCheck | None, poll_s: float) -> AsyncIterator[None]:
    """Raise ``GenerationCancelled`` in the block once ``is_cancelled()`` turns true.

    Checking between chunks is not enough: a request queued in the backend's scheduler (or
    waiting for Ollama to load a model) sends nothing for minutes. The watcher interrupts
    that wait the way ``asyncio.timeout`` does: cancel the task, then ``uncancel`` it.
    """
    task = asyncio.current_task()
    if is_cancelled is None or task is None:
        yield
        return
    fired = False

    async def watch() -> None:
        nonlocal fired
        while not is_cancelled():
            await asyncio.sleep(poll_s)
        fired = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if fired and task.uncancel() == 0:
            raise GenerationCancelled from None
        raise
    finally:
        watcher.cancel()


# --- the shared runtime ------------------------------------------------------------------
@dataclass
class StreamState:
    """What one streamed generation has gathered so far."""

    model: str
    on_token: TokenCallback | None
    on_reasoning: TokenCallback | None = None
    started: float = field(default_factory=time.perf_counter)
    parts: list[str] = field(default_factory=list)
    reasoning_parts: list[str] = field(default_factory=list)
    time_to_first_token_s: float | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    done: bool = False
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # by index

    def add_tool_call(
        self, index: int, call_id: str | None, name: str | None, arguments: str
    ) -> None:
        """A tool call, or the next piece of one (OpenAI streams its arguments in pieces)."""
        self._first_token()
        call = self.tool_calls.setdefault(
            index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        call["id"] = call["id"] or call_id or f"call_{index}"
        call["function"]["name"] += name or ""
        call["function"]["arguments"] += arguments

    def add_reasoning(self, text: str) -> None:
        """A piece of the model's reasoning: kept apart from the answer (``on_reasoning``,
        not ``on_token``); its first piece is the first token."""
        self._first_token()
        self.reasoning_parts.append(text)
        if self.on_reasoning is not None:
            self.on_reasoning(text)

    def _first_token(self) -> None:
        """Time to first token: to the first piece of answer, thought or tool call."""
        if self.time_to_first_token_s is None:
            self.time_to_first_token_s = time.perf_counter() - self.started

    def add(self, text: str) -> None:
        if not text:
            return
        self._first_token()
        self.parts.append(text)
        if self.on_token is not None:
            self.on_token(text)

    def completion(self, finish_reason: FinishReason | None = None) -> Completion:
        return Completion(
            text="".join(self.parts),
            finish_reason=finish_reason or self.finish_reason or "stop",
            prompt_tokens=self.prompt_tokens or 0,
            # Without a usage report, one streamed piece is one token (true for vLLM/Ollama).
            completion_tokens=(
                self.completion_tokens
                if self.completion_tokens is not None
                else len(self.parts) + len(self.reasoning_parts)
            ),
            model=self.model,
            time_to_first_token_s=self.time_to_first_token_s,
            tool_calls=[self.tool_calls[i] for i in sorted(self.tool_calls)] or None,
            reasoning="".join(self.reasoning_parts) if self.reasoning_parts else None,
        )


class HTTPRuntime:
    """A runtime that streams one POST per generation; subclasses speak the wire format."""

    name: ClassVar[str]
    path: ClassVar[str]

    def __init__(
        self,
        base_url: str,
        options: HTTPOptions | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.options = options or HTTPOptions()
        self.headers = dict(headers or {})
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        """The client of the running event loop (a client cannot outlive or change loops)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = make_client(self.base_url, self.options, self.headers)
            self._client_loop = loop
        return self._client

    async def warm_up(self) -> None:
        """Nothing to load: the client connects on the first request."""

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._client_loop is asyncio.get_running_loop():
            await client.aclose()

    async def generate(
        self,
        request: GenerationRequest,
        on_token: TokenCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        *,
        on_reasoning: TokenCallback | None = None,
    ) -> Completion:
        """Stream one generation; see ``runtimes.base.Runtime.generate``."""
        model = await self.resolve_model(request)
        state = StreamState(model=model, on_token=on_token, on_reasoning=on_reasoning)
        if is_cancelled is not None and is_cancelled():
            return state.completion("cancelled")
        payload = self.payload(request, model)
        try:
            async with (
                cancel_watch(is_cancelled, self.options.cancel_poll_s),
                open_stream(self.client, self.name, self.path, payload) as response,
            ):
                # Lines split here, on bytes: httpx's text decoding and line splitting
                # cost as much per chunk as the parsing.
                pending = b""
                async for data in response.aiter_bytes():
                    if is_cancelled is not None and is_cancelled():
                        raise GenerationCancelled
                    *lines, pending = (pending + data).split(b"\n")
                    for line in lines:
                        if line.strip() and not state.done:
                            self.parse_line(line, state)
        except GenerationCancelled:
            return state.completion("cancelled")
        if not state.done:
            raise _tagged(BackendUnavailable(f"{self.name} ended the stream early"), None)
        return state.completion()

    async def resolve_model(self, request: GenerationRequest) -> str:
        raise NotImplementedError

    def payload(self, request: GenerationRequest, model: str) -> dict[str, Any]:
        raise NotImplementedError

    def parse_line(self, line: bytes, state: StreamState) -> None:
        """Fold one stream line (no newline; maybe a trailing CR) into ``state``; set
        ``state.done`` on the last one."""
        raise NotImplementedError
