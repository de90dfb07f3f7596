"""Run an ASGI app under uvicorn: in a thread for tests, or as a subprocess for benchmarks.

    with ServerThread(OpenAIStandIn(OpenAIConfig(step_base_s=0.001)).app) as server:
        httpx.get(server.url + "/health")

    with StandInProcess("tests.standins.ollama_server", "--num-parallel", "4") as proc:
        ...  # proc.url

Both bind 127.0.0.1 on a free port. As in httpx's own test-suite, the thread runs a real
``uvicorn.Server``, so keep-alive timeouts, disconnects and resets are the real thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx
import uvicorn

REPO_ROOT = Path(__file__).resolve().parents[2]

C = TypeVar("C")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS may hand it out again later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on a daemon thread; ``url`` is ready once ``start()`` returns."""

    def __init__(self, app: Any, timeout_keep_alive: float = 5, **uvicorn_options: Any) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]  (float works)
            timeout_graceful_shutdown=1,
            **uvicorn_options,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class StandInProcess:
    """``python -m <module> --port <free> <args>`` in the repo root, stopped on exit."""

    def __init__(self, module: str, *args: str, ready_path: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", module, "--port", str(self.port), *args]
        if ready_path is None:
            ready_path = "/api/version" if "ollama" in module else "/health"
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20) -> StandInProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.proc = subprocess.Popen(self.command, cwd=REPO_ROOT, env=env)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.command} not ready after {timeout_s} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- command line shared by both stand-ins -----------------------------------------------
def run_stand_in(
    make_app: Callable[[C], Any], config_cls: type[C], description: str, argv: list[str] | None
) -> None:
    """A stand-in's ``main``: ``--host``/``--port``/``--timeout-keep-alive`` plus one flag
    per ``config_cls`` field, then serve ``make_app(config)`` in the foreground, as
    ``vllm serve`` / ``ollama serve`` do (uvloop, httptools)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--timeout-keep-alive", type=float, default=5, help="uvicorn idle timeout (s)"
    )
    fields = dataclasses.fields(config_cls)  # type: ignore[arg-type]
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=f.default)
        elif f.name == "models":
            parser.add_argument(flag, nargs="+", default=list(f.default_factory()))
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=f.default, help=f"default {f.default}")
    args = parser.parse_args(argv)
    config = config_cls(**{f.name: getattr(args, f.name) for f in fields})
    uvicorn.run(
        make_app(config),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=args.timeout_keep_alive,
    )


class StandInControl:
    """Sync client for a stand-in's ``/_standin`` endpoints (see ``control.py``)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def inject(self, *faults: dict[str, Any]) -> None:
        """Queue faults, e.g. ``inject({"status": 503, "count": 2})``."""
        self.http.post("/_standin/faults", json=list(faults)).raise_for_status()

    def reset(self) -> None:
        """Clear queued faults and the request log."""
        self.http.delete("/_standin/faults").raise_for_status()
        self.http.delete("/_standin/requests").raise_for_status()

    def requests(self, settled: bool = True, timeout_s: float = 5) -> list[dict[str, Any]]:
        """The request log; ``settled`` waits until every request has ended (the server
        notices a client's disconnect a moment after the client closed)."""
        deadline = time.monotonic() + timeout_s
        while True:
            log = self.http.get("/_standin/requests").json()
            if not settled or all(r["ended_at"] for r in log) or time.monotonic() > deadline:
                return log
            time.sleep(0.01)

    def stats(self) -> dict[str, Any]:
        return self.http.get("/_standin/stats").json()

    def wait_idle(self, timeout_s: float = 5) -> dict[str, Any]:
        """Stats once no sequence runs or waits (aborts take effect at the next step)."""
        deadline = time.monotonic() + timeout_s
        while (stats := self.stats())["running"] or stats["waiting"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"stand-in still busy: {stats}")
            time.sleep(0.01)
        return stats
