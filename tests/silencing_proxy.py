"""A TCP proxy whose open connections can be made to go silent, for tests.

``silence()`` leaves every connection open at that moment open but mute: bytes are read
and dropped both ways, nothing is closed or reset, as a network partition or a NAT timeout
leaves a TCP connection (half-open). Connections made afterwards work. ``partition()``
silences new connections too, until ``heal()``; the ones made meanwhile stay silent.
"""

from __future__ import annotations

import asyncio
import threading
from urllib.parse import urlsplit


class SilencingProxy:
    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._scheme_and_db = (parts.scheme, parts.path)
        self._generation = 0  # connections of an older generation are silenced
        self._partitioned = False
        self._loop = asyncio.new_event_loop()
        self.port = 0

    @property
    def url(self) -> str:
        scheme, db = self._scheme_and_db
        return f"{scheme}://127.0.0.1:{self.port}{db}"

    def start(self) -> SilencingProxy:
        ready = threading.Event()

        async def serve() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await server.serve_forever()

        threading.Thread(target=self._loop.run_until_complete, args=(serve(),), daemon=True).start()
        ready.wait(5)
        return self

    def silence(self) -> None:
        self._generation += 1  # read by the proxy's loop; an int swap is atomic

    def partition(self) -> None:
        self._partitioned = True
        self.silence()

    def heal(self) -> None:
        self._partitioned = False

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self._upstream)
        except OSError:  # upstream gone (the test's redis-server stopped): refuse, as it would
            client_w.close()
            return
        generation = -1 if self._partitioned else self._generation

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if self._generation == generation:
                    sink.write(data)
                    await sink.drain()

        await asyncio.gather(
            pump(client_r, upstream_w), pump(upstream_r, client_w), return_exceptions=True
        )
        for writer in (client_w, upstream_w):
            writer.close()
