"""``StreamTransport`` on the wire: framing, keep-alive and errors, against servers that
send exactly the bytes each test scripts (and uvicorn, through the runtimes' tests)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from runtimes.transport import StreamTransport

pytestmark = pytest.mark.anyio

# (reader, writer, n): the server's side of its n-th connection (from 1).
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@dataclass
class Scripted:
    url: str
    connections: int = 0


@asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[Scripted]:
    """A TCP server on a free port running ``handler`` per connection."""
    server_info = Scripted("")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_info.connections += 1
        try:
            await handler(reader, writer, server_info.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        server_info.url = f"http://127.0.0.1:{port}"
        yield server_info
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def client(url: str, **options: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, transport=StreamTransport(), timeout=httpx.Timeout(2, **options)
    )


async def test_chunked_body_with_extensions_and_trailers_then_keep_alive() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head, body = await read_request(reader)
            assert head.startswith(b"POST /v1/x?q=1 HTTP/1.1\r\n") and body == b'{"a":1}'
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n"
            )
            await writer.drain()

    async with scripted(handler) as server, client(server.url) as http:
        for _ in range(3):
            response = await http.post("/v1/x", params={"q": 1}, json={"a": 1})
            assert response.status_code == 200 and response.text == "hello world"
    assert server.connections == 1  # one keep-alive connection served all three


async def test_content_length_body_and_streamed_parts() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 10\r\n\r\n01234")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"56789")
        await writer.drain()
        await reader.read()

    async with scripted(handler) as server, client(server.url) as http:
        async with http.stream("GET", "/") as response:
            parts = [part async for part in response.aiter_raw()]
        assert response.status_code == 201 and response.reason_phrase == "Created"
        assert b"".join(parts) == b"0123456789" and len(parts) == 2


async def test_body_to_end_of_stream_and_connection_close_are_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 1:  # no length, no chunking: the body ends with the connection
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")

    async with scripted(handler) as server, client(server.url) as http:
        assert (await http.get("/")).text == "until the end"
        assert (await http.get("/")).text == "ok"
        assert (await http.get("/")).text == "ok"
    assert server.connections == 3


async def test_informational_response_is_skipped_and_204_has_no_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes")
        await reader.read()

    async with scripted(handler) as server, client(server.url) as http:
        first = await http.delete("/")
        assert first.status_code == 204 and first.content == b""
        assert (await http.get("/")).text == "yes"  # same connection, framing intact


async def test_abandoned_body_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n")
        await writer.drain()
        if n == 1:
            assert await reader.read() == b""  # the client hung up mid-body
            closed.set()
        else:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            await reader.read()

    async with scripted(handler) as server, client(server.url) as http:
        async with http.stream("GET", "/") as response:
            async for _ in response.aiter_raw():
                break
        await asyncio.wait_for(closed.wait(), 2)
        assert (await http.get("/")).text == "one"
    assert server.connections == 2


async def test_server_closing_an_idle_connection_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()  # then close: an idle timeout on the server's side

    async with scripted(handler) as server, client(server.url) as http:
        assert (await http.get("/")).text == "ok"
        await asyncio.sleep(0.05)  # the FIN arrives while the connection sits in the pool
        assert (await http.get("/")).text == "ok"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"", httpx.RemoteProtocolError),  # closed before answering
        (b"SMTP ready\r\n\r\n", httpx.RemoteProtocolError),
        (b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n", httpx.RemoteProtocolError),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", httpx.RemoteProtocolError),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", httpx.RemoteProtocolError),
    ],
)
async def test_protocol_errors_are_httpx_errors(reply: bytes, error: type[Exception]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    async with scripted(handler) as server, client(server.url) as http:
        with pytest.raises(error):
            await http.get("/")


async def test_read_timeout_before_and_during_the_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        head, _ = await read_request(reader)
        if b"/slow-body" in head:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01")
            await writer.drain()
        await reader.read()  # then say nothing more

    async with scripted(handler) as server, client(server.url, read=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/silent")
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/slow-body")


async def test_connect_errors() -> None:
    async with scripted(lambda reader, _writer, _n: read_request(reader)) as server:
        pass  # closed: nothing listens on its port any more
    async with client(server.url) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/")
    async with httpx.AsyncClient(transport=StreamTransport()) as http:
        with pytest.raises(httpx.UnsupportedProtocol):
            await http.get("ftp://127.0.0.1/")


async def test_tls_to_a_trusted_server_only(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecret")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_tls)
    url = f"https://localhost:{server.sockets[0].getsockname()[1]}/"
    try:
        trusting = StreamTransport(ssl_context=ssl.create_default_context(cafile=str(cert)))
        async with httpx.AsyncClient(transport=trusting) as http:
            assert (await http.get(url)).text == "secret"
        async with httpx.AsyncClient(transport=StreamTransport()) as http:  # system CAs only
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get(url)
    finally:
        server.close()
