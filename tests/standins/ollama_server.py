"""A stand-in for Ollama's REST API: same routes, NDJSON streaming, errors and scheduling.

Serves ``GET /api/tags``, ``GET /api/version``, ``POST /api/show``, ``POST /api/chat`` and
``POST /api/generate`` (``stream`` defaults to true, as in Ollama). Streamed lines carry
``message.content`` (chat) or ``response`` (generate); the last one has ``done: true``,
``done_reason`` and the ``*_count`` / ``*_duration`` (nanoseconds) fields. As with
``OLLAMA_NUM_PARALLEL`` / ``OLLAMA_MAX_QUEUE``, ``num_parallel`` requests generate together
and up to ``max_queue`` wait; beyond that the server answers 503 "server busy".

Run it: ``python -m tests.standins.ollama_server --port 11434 [--num-parallel 4 ...]``; in
a test: ``ServerThread(OllamaStandIn(OllamaConfig(...)).app)``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.standins.control import (
    ConnectionControl,
    Control,
    RequestRecord,
    TokenStream,
    fault_response,
    read_json,
    until_disconnect,
)
from tests.standins.engine import (
    Engine,
    LengthDistribution,
    QueueFull,
    Reply,
    Sequence,
    count_prompt_tokens,
    plan_reply,
    plan_tool_call,
    with_reasoning,
)

BUSY = "server busy, please try again.  maximum pending requests exceeded"
"""Ollama's ErrMaxQueue text (two spaces included), sent with 503."""

LOAD_DURATION_NS = 2_000_000
"""Reported load_duration: the model is always resident here."""


@dataclass
class OllamaConfig:
    """How the stand-in behaves; every field is also a CLI flag (underscores -> dashes)."""

    models: list[str] = field(default_factory=lambda: ["phi4-mini:latest"])
    num_parallel: int = 4
    max_queue: int = 512
    step_base_s: float = 0.02
    step_per_seq_s: float = 0.002
    output_len: str = "uniform:16:256"
    seed: int = 0
    zero_latency: bool = False
    version: str = "0.6.5"
    # > 0: a thinking model: this many tokens of thought, as message.thinking, per answer.
    thinking_tokens: int = 0


class OllamaStandIn:
    """One server: its config, engine, control state and ASGI ``app``."""

    def __init__(self, config: OllamaConfig | None = None) -> None:
        self.config = config or OllamaConfig()
        c = self.config
        self.engine = Engine(c.num_parallel, c.step_base_s, c.step_per_seq_s, c.max_queue)
        self.lengths = LengthDistribution(c.output_len, c.seed)
        self.control = Control()
        routes = [
            Route("/", lambda r: Response("Ollama is running", media_type="text/plain")),
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/show", self.show, methods=["POST"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            *self.control.routes(self.stats),
        ]
        self.app = ConnectionControl(Starlette(routes=routes))

    def resolve(self, name: str) -> str | None:
        """Ollama's name matching: a missing tag means ``:latest``."""
        full = name if ":" in name else f"{name}:latest"
        return full if full in self.config.models else None

    def stats(self) -> dict[str, Any]:
        e = self.engine
        return {"running": len(e.running), "waiting": len(e.waiting), "steps": e.steps}

    # --- metadata routes ---------------------------------------------------------------
    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": self.config.version})

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [_model_card(m) for m in self.config.models]})

    async def show(self, request: Request) -> Response:
        try:
            body = await read_json(request)
        except ValueError as exc:
            return _error(400, str(exc))
        name = body.get("model") or body.get("name") or ""
        if self.resolve(name) is None:
            return _error(404, f"model '{name}' not found")
        card = _model_card(self.resolve(name) or name)
        return JSONResponse({"modelfile": "", "parameters": "", "details": card["details"]})

    # --- generation --------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._generation(request, chat=True)

    async def generate(self, request: Request) -> Response:
        return await self._generation(request, chat=False)

    async def _generation(self, request: Request, chat: bool) -> Response:
        received = time.monotonic_ns()
        try:
            body = await read_json(request)
        except ValueError as exc:
            return _error(400, str(exc))
        rec = self.control.record(request, body)
        fault = self.control.take_fault()
        if fault is not None:
            if fault.latency_s:
                await asyncio.sleep(fault.latency_s)
            injected = fault_response(
                fault, rec, lambda s: {"error": BUSY if s == 503 else "injected fault"}
            )
            if injected is not None:
                return injected
        name = body.get("model") if isinstance(body, dict) else None
        if not name:
            return _finish(rec, _error(400, "model is required"))
        if self.resolve(name) is None:
            return _finish(rec, _error(404, f'model "{name}" not found, try pulling it first'))
        if chat:
            messages = body.get("messages") or []
        else:
            messages = (
                [{"role": "system", "content": body.get("system") or ""}]
                if body.get("system")
                else []
            )
            messages.append({"role": "user", "content": body.get("prompt") or ""})
        options = body.get("options") or {}
        num_predict = options.get("num_predict", -1)
        stop = options.get("stop") or []
        limit = None if num_predict is None or num_predict < 0 else num_predict
        fmt = body.get("format")
        if fmt and not (fmt == "json" or isinstance(fmt, dict)):
            return _finish(rec, _error(400, f"invalid format: {fmt!r}"))
        reply = plan_tool_call(messages, body.get("tools"), None, options.get("seed")) or plan_reply(
            messages,
            self.lengths.draw(),
            limit,
            seed=options.get("seed"),
            stop=[stop] if isinstance(stop, str) else list(stop),
            json_schema=fmt if isinstance(fmt, dict) else fmt == "json",
        )
        reply = with_reasoning(reply, self.config.thinking_tokens, limit)
        gen = _Generation(name, chat, count_prompt_tokens(messages), received)
        drop_after = fault.after_tokens if fault and fault.drop == "mid_stream" else None
        try:
            seq = None if self.config.zero_latency else self.engine.submit(reply)
        except QueueFull:
            return _finish(rec, _error(503, BUSY))
        if body.get("stream", True):
            return TokenStream(
                lambda: self._lines(gen, reply, seq, rec),
                "application/x-ndjson",
                rec,
                drop_after,
                on_close=lambda: self._release(seq),
            )
        disconnected, _ = await until_disconnect(
            self._collect(gen, reply, seq, rec), request.receive
        )
        rec.ended_at = time.time()
        if disconnected:
            self._release(seq)
            rec.client_closed = True
            return Response(status_code=499)
        rec.status = 200
        if reply.tool:
            return JSONResponse(gen.line("", "stop", len(reply.tokens), [_tool_call(reply)]))
        return JSONResponse(
            gen.line(reply.answer, reply.finish_reason, len(reply.tokens), thinking=reply.thought)
        )

    def _release(self, seq: Sequence | None) -> None:
        """Free the slot of a sequence whose client left (even before its stream began)."""
        if seq is not None and not seq.finished:
            self.engine.abort(seq)

    async def _tokens(
        self, gen: _Generation, seq: Sequence | None, rec: RequestRecord, reply: Reply
    ) -> AsyncIterator[list[str]]:
        if seq is None:  # zero latency
            gen.first_token_ns = time.monotonic_ns()
            rec.scheduled_at = time.time()
            rec.completion_tokens = len(reply.tokens)
            if reply.tokens:
                yield reply.tokens
            return
        sent = 0
        try:
            while new := await seq.new_tokens(sent):
                if gen.first_token_ns is None:
                    gen.first_token_ns = time.monotonic_ns()
                    rec.scheduled_at = time.time()
                sent += len(new)
                rec.completion_tokens = sent
                yield new
        finally:
            self._release(seq)

    async def _lines(
        self, gen: _Generation, reply: Reply, seq: Sequence | None, rec: RequestRecord
    ) -> AsyncIterator[bytes]:
        sent = 0
        async for batch in self._tokens(gen, seq, rec, reply):
            lines = []
            for token in batch:
                sent += 1
                if sent <= reply.reasoning:
                    lines.append(_ndjson(gen.line("", thinking=token)))
                elif not reply.tool:  # a tool call is parsed whole, then sent in one line
                    lines.append(_ndjson(gen.line(token)))
            if lines:
                yield b"".join(lines)
        if reply.tool:
            yield _ndjson(gen.line("", tool_calls=[_tool_call(reply)]))
        # Ollama ends a tool call as any answer: done_reason "stop".
        done_reason = "stop" if reply.tool else reply.finish_reason
        yield _ndjson(gen.line("", done_reason, len(reply.tokens)))

    async def _collect(
        self, gen: _Generation, reply: Reply, seq: Sequence | None, rec: RequestRecord
    ) -> None:
        async for _ in self._tokens(gen, seq, rec, reply):
            pass


@dataclass
class _Generation:
    """What each NDJSON line needs to know about its request."""

    model: str
    chat: bool
    prompt_tokens: int
    received_ns: int
    first_token_ns: int | None = None

    def line(
        self,
        text: str,
        done_reason: str | None = None,
        eval_count: int = 0,
        tool_calls: list[dict] | None = None,
        thinking: str | None = None,
    ) -> dict:
        created = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        out: dict[str, Any] = {"model": self.model, "created_at": created}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
            if tool_calls:
                out["message"]["tool_calls"] = tool_calls
            if thinking:
                out["message"]["thinking"] = thinking
        else:
            out["response"] = text
        out["done"] = done_reason is not None
        if done_reason is None:
            return out
        now = time.monotonic_ns()
        first = self.first_token_ns or now
        out["done_reason"] = done_reason
        if not self.chat:
            out["context"] = list(range(1, self.prompt_tokens + eval_count + 1))
        out |= {
            "total_duration": now - self.received_ns,
            "load_duration": LOAD_DURATION_NS,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": max(0, first - self.received_ns - LOAD_DURATION_NS),
            "eval_count": eval_count,
            "eval_duration": now - first,
        }
        return out


def _tool_call(reply: Reply) -> dict[str, Any]:
    """As Ollama sends a call: its arguments an object, not JSON text; no id."""
    return {"function": {"name": reply.tool, "arguments": json.loads(reply.text)}}


def _model_card(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": "2025-03-01T12:00:00.000000000Z",
        "size": 2_491_876_774,
        "digest": "78fad5d182a7c33065e153a5f8ba210754207ba9d91973f57dffa7f487363753",
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "phi3",
            "families": ["phi3"],
            "parameter_size": "3.8B",
            "quantization_level": "Q4_K_M",
        },
    }


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _finish(rec: RequestRecord, response: Response) -> Response:
    rec.status, rec.ended_at = response.status_code, time.time()
    return response


def _ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.standins.ollama_server --port N [options]``."""
    from tests.standins.server_thread import run_stand_in

    run_stand_in(lambda config: OllamaStandIn(config).app, OllamaConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
