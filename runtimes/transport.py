"""``StreamTransport``: the runtimes' httpx transport, HTTP/1.1 on asyncio streams.

Why not httpx's default (httpcore): a worker streams tens of generations at once, a chunk
per token each, and httpcore's per-chunk bookkeeping (h11 events, anyio stream wrappers,
pool locks) costs 110-140 us of CPU per chunk at 64 streams here, against 25-35 us for
this transport (``bench/http_client.py``). The worker's CPU per job is mostly that, and a
busy worker delays every job's hand-offs (see ``docs/performance.md``).

Scope: what vLLM and Ollama need. HTTP/1.1, plain or TLS; request bodies sent with a
``Content-Length``; responses framed by ``Content-Length``, chunked, or read to the end;
keep-alive connections pooled per origin. No proxies, HTTP/2 or upgrades.

Failures raise httpx's own exceptions, as httpcore raises them (timeouts as
``*Timeout``, a peer that closes before answering as ``RemoteProtocolError``, socket
errors as ``ConnectError``/``WriteError``/``ReadError``), so callers map them in one
place (``runtimes.http``) whichever transport is underneath.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from typing import NamedTuple

import httpx

Origin = tuple[str, str, int]  # scheme, host, port

_HEAD_LIMIT = 64 * 1024  # status line and headers
_READ_SIZE = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})


class _Head(NamedTuple):
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    chunked: bool
    length: int | None


@contextmanager
def _mapped(
    timeout: type[httpx.TimeoutException], failure: type[httpx.TransportError]
) -> Iterator[None]:
    """Socket-level exceptions as the httpx exceptions httpcore would raise."""
    try:
        yield
    except TimeoutError as exc:  # before OSError: TimeoutError is one
        raise timeout(str(exc) or "timed out") from exc
    except ssl.SSLError as exc:  # before ValueError: a failed certificate check is both
        raise failure(str(exc)) from exc
    except asyncio.IncompleteReadError as exc:
        raise httpx.RemoteProtocolError(
            "peer closed connection without sending complete message"
        ) from exc
    except (asyncio.LimitOverrunError, ValueError) as exc:  # over-long or malformed framing
        raise httpx.RemoteProtocolError(f"malformed HTTP response: {exc}") from exc
    except OSError as exc:
        raise failure(str(exc) or type(exc).__name__) from exc


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self, expiry_s: float) -> bool:
        """Still open (the server has not closed it) and not idle too long."""
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and time.monotonic() - self.idle_since < expiry_s
        )

    def close(self) -> None:
        self.writer.close()

    async def aclose(self) -> None:
        """Close and wait until the socket is: the server sees the disconnect at once."""
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


class StreamTransport(httpx.AsyncBaseTransport):
    """Pass as ``httpx.AsyncClient(transport=StreamTransport())``. One per event loop."""

    def __init__(
        self,
        *,
        keepalive_expiry_s: float = 5.0,
        max_keepalive_connections: int = 64,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.keepalive_expiry_s = keepalive_expiry_s
        self.max_keepalive_connections = max_keepalive_connections
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        connection = self._checkout(origin) or await self._connect(origin, timeouts.get("connect"))
        try:
            await self._send(connection, request, timeouts.get("write"))
            head = await self._receive_head(connection, timeouts.get("read"))
        except BaseException:
            await connection.aclose()
            raise
        has_body = request.method != "HEAD" and head.status not in _NO_BODY_STATUS
        body = _ResponseBody(self, origin, connection, head, has_body, timeouts.get("read"))
        return httpx.Response(
            head.status,
            headers=head.headers,
            stream=body,
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
        )

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    # --- connections -------------------------------------------------------------------
    def _checkout(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closing
            if connection.usable(self.keepalive_expiry_s):
                return connection
            connection.close()
        return None

    def _checkin(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self.max_keepalive_connections:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        tls = (self._ssl_context or ssl.create_default_context()) if scheme == "https" else None
        with _mapped(httpx.ConnectTimeout, httpx.ConnectError):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None, limit=_HEAD_LIMIT
                )
        return _Connection(reader, writer)

    # --- one exchange ------------------------------------------------------------------
    async def _send(
        self, connection: _Connection, request: httpx.Request, timeout: float | None
    ) -> None:
        body = b"".join([part async for part in request.stream])  # type: ignore[union-attr]
        lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
        for name, value in request.headers.raw:
            if name.lower() not in (b"content-length", b"transfer-encoding"):
                lines.append(b"%s: %s\r\n" % (name, value))
        if body or request.method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        with _mapped(httpx.WriteTimeout, httpx.WriteError):
            async with asyncio.timeout(timeout):
                connection.writer.write(b"".join(lines) + body)
                await connection.writer.drain()

    async def _receive_head(self, connection: _Connection, timeout: float | None) -> _Head:
        with _mapped(httpx.ReadTimeout, httpx.ReadError):
            async with asyncio.timeout(timeout):
                while True:
                    raw = await connection.reader.readuntil(b"\r\n\r\n")
                    head = _parse_head(raw)
                    if not 100 <= head.status < 200:  # skip "100 Continue" and the like
                        return head


class _ResponseBody(httpx.AsyncByteStream):
    """The body as it arrives; the connection goes back to the pool once it is read whole,
    and is closed if the body is abandoned early (the server then stops sending)."""

    def __init__(
        self,
        transport: StreamTransport,
        origin: Origin,
        connection: _Connection,
        head: _Head,
        has_body: bool,
        read_timeout: float | None,
    ) -> None:
        self._transport = transport
        self._origin = origin
        self._connection: _Connection | None = connection
        self._head = head
        self._has_body = has_body
        self._timeout = read_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx.StreamConsumed()
        reader, head = connection.reader, self._head
        if not self._has_body:
            parts: AsyncIterator[bytes] = _nothing()
        elif head.chunked:
            parts = _chunked(reader)
        elif head.length is not None:
            parts = _sized(reader, head.length)
        else:
            parts = _to_eof(reader)
        with _mapped(httpx.ReadTimeout, httpx.ReadError):
            while True:
                async with asyncio.timeout(self._timeout):
                    part = await anext(parts, None)
                if part is None:
                    break
                yield part
        self._connection = None
        if head.keep_alive and (head.chunked or head.length is not None or not self._has_body):
            self._transport._checkin(self._origin, connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.aclose()


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield


async def _chunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)  # chunk extensions are ignored
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, ignored
                pass
            return
        data = await reader.readexactly(size + 2)
        if data[-2:] != b"\r\n":
            raise ValueError("chunk not terminated by CRLF")
        yield data[:-2]


async def _sized(reader: asyncio.StreamReader, length: int) -> AsyncIterator[bytes]:
    while length > 0:
        data = await reader.read(min(length, _READ_SIZE))
        if not data:
            raise asyncio.IncompleteReadError(b"", length)
        length -= len(data)
        yield data


async def _to_eof(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while data := await reader.read(_READ_SIZE):
        yield data


def _parse_head(raw: bytes) -> _Head:
    status_line, *header_lines = raw[:-4].split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    if not version.startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    code, _, reason = rest.partition(b" ")
    headers: list[tuple[bytes, bytes]] = []
    connection_tokens: set[bytes] = set()
    chunked, length = False, None
    for line in header_lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"malformed header line: {line[:80]!r}")
        name, value = name.strip(), value.strip()
        headers.append((name, value))
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
        elif lowered == b"content-length":
            length = int(value)
        elif lowered == b"connection":
            connection_tokens.update(t.strip().lower() for t in value.split(b","))
    keep_alive = (
        b"close" not in connection_tokens
        if version == b"HTTP/1.1"
        else b"keep-alive" in connection_tokens
    )
    return _Head(int(code), reason, headers, keep_alive, chunked, None if chunked else length)
