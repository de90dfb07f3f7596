"""CPU per streamed chunk: the runtimes' httpx transport vs httpx's default (httpcore).

    python -m bench http_client                        (make bench NAME=http_client)

A worker streams many generations at once, one chunk per token each, so the client's cost
per chunk is most of a worker's CPU per job (``runtimes/transport.py`` says why it exists).
Against a stand-in vLLM started here (64 running sequences, 5 ms engine steps, 80 tokens
per request), one process keeps ``--concurrency`` streams in flight and reads every chunk:

- ``httpx-httpcore``: ``httpx.AsyncClient`` as shipped, ``aiter_bytes``;
- ``httpx-stream-transport``: the same client on ``StreamTransport``;
- ``vllm-runtime``: ``VLLMRuntime.generate`` (the transport plus SSE and JSON parsing,
  what a worker runs), on asyncio's event loop and on uvloop's (the workers' loop).

CPU is the process's own (``time.process_time``); the ratio is per chunk, against httpcore.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import uvloop

from bench.common import write_results
from runtimes.base import GenerationRequest
from runtimes.transport import StreamTransport
from runtimes.vllm import VLLMRuntime
from tests.standins.server_thread import StandInProcess

MODEL = "microsoft/Phi-4-mini-instruct"
TOKENS = 80


def body(i: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"request {i}"}],
        "max_tokens": TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def raw_chunks(client: httpx.AsyncClient, i: int) -> int:
    chunks = 0
    async with client.stream("POST", "/v1/chat/completions", json=body(i)) as response:
        async for _ in response.aiter_bytes():
            chunks += 1
    return chunks


def with_client(transport: httpx.AsyncBaseTransport | None) -> Callable[[str], Any]:
    async def run(url: str, n: int, concurrency: int) -> tuple[int, int]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=url, timeout=60, limits=limits, transport=transport
        ) as client:
            counts = await bounded(n, concurrency, lambda i: raw_chunks(client, i))
        return sum(counts), sum(counts)

    return run


async def with_runtime(url: str, n: int, concurrency: int) -> tuple[int, int]:
    runtime = VLLMRuntime(url, model=MODEL)
    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=TOKENS)
    tokens: list[str] = []
    completions = await bounded(
        n, concurrency, lambda _: runtime.generate(request, tokens.append, lambda: False)
    )
    await runtime.aclose()
    # One SSE event per token, plus the role, usage and [DONE] chunks.
    return len(tokens) + 3 * len(completions), len(tokens)


async def bounded(n: int, concurrency: int, one: Callable[[int], Awaitable[Any]]) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> Any:
        async with gate:
            return await one(i)

    return await asyncio.gather(*(gated(i) for i in range(n)))


def measure(
    name: str, run: Callable[[str, int, int], Any], url: str, n: int, concurrency: int,
    loop: str = "asyncio",
) -> dict[str, Any]:  # fmt: skip
    runner = uvloop.run if loop == "uvloop" else asyncio.run
    runner(run(url, concurrency, concurrency))  # warm: connections, imports
    cpu, wall = time.process_time(), time.perf_counter()
    chunks, tokens = runner(run(url, n, concurrency))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    row = {
        "client": name,
        "loop": loop,
        "requests": n,
        "chunks": chunks,
        "tokens": tokens,
        "cpu_s": round(cpu, 3),
        "cpu_us_per_chunk": round(cpu / chunks * 1e6, 1),
        "cpu_ms_per_request": round(cpu / n * 1e3, 2),
        "wall_s": round(wall, 2),
    }
    print(row, flush=True)
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_client", description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    standin = StandInProcess(
        "tests.standins.openai_server", "--max-num-seqs", "64", "--step-base-s", "0.005",
        "--step-per-seq-s", "0", "--output-len", str(TOKENS),
    ).start()  # fmt: skip
    try:
        assert standin.url is not None
        n, c = args.requests, args.concurrency
        rows = [
            measure("httpx-httpcore", with_client(None), standin.url, n, c),
            measure("httpx-stream-transport", with_client(StreamTransport()), standin.url, n, c),
            measure("vllm-runtime", with_runtime, standin.url, n, c),
            measure("vllm-runtime", with_runtime, standin.url, n, c, loop="uvloop"),
        ]
    finally:
        standin.stop()
    per_chunk = {(r["client"], r["loop"]): r["cpu_us_per_chunk"] for r in rows}
    base = per_chunk[("httpx-httpcore", "asyncio")]
    ratios = {
        "stream_transport_cpu_vs_httpcore": round(
            per_chunk[("httpx-stream-transport", "asyncio")] / base, 3
        ),
        "runtime_uvloop_cpu_vs_httpcore": round(per_chunk[("vllm-runtime", "uvloop")] / base, 3),
    }
    write_results(
        "http_client", rows, ratios,
        {"requests": n, "concurrency": c, "tokens_per_request": TOKENS},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
