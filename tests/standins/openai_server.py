"""A stand-in for vLLM's OpenAI-compatible server: same routes, wire format and errors.

Serves ``GET /health``, ``GET /v1/models`` and ``POST /v1/chat/completions`` (streamed as
SSE ``chat.completion.chunk`` objects ending in ``data: [DONE]``, or one ``chat.completion``),
with vLLM's error bodies: 404 ``NotFoundError`` for an unknown model, 400
``BadRequestError`` when prompt + max_tokens exceed ``max_model_len``. Generation goes
through the continuous-batching ``Engine``; ``--zero-latency`` skips it and answers at once.
Control endpoints for faults and the request log are described in ``control.py``.

Run it: ``python -m tests.standins.openai_server --port 8001 [--max-num-seqs 8 ...]``; in a
test: ``ServerThread(OpenAIStandIn(OpenAIConfig(...)).app)``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
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
    Reply,
    Sequence,
    count_prompt_tokens,
    plan_reply,
    plan_tool_call,
    with_reasoning,
)

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "Unauthorized",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


@dataclass
class OpenAIConfig:
    """How the stand-in behaves; every field is also a CLI flag (underscores -> dashes)."""

    model: str = "microsoft/Phi-4-mini-instruct"
    max_model_len: int = 4096
    max_num_seqs: int = 64
    step_base_s: float = 0.01
    step_per_seq_s: float = 0.0002
    output_len: str = "uniform:16:256"
    seed: int = 0
    zero_latency: bool = False
    error_format: str = "flat"  # "flat": {"object": "error", ...}; "nested": {"error": {...}}
    api_key: str | None = None
    # > 0: a reasoning model served with --reasoning-parser: this many tokens of thought,
    # streamed as delta.reasoning, before each answer.
    reasoning_tokens: int = 0


class OpenAIStandIn:
    """One server: its config, engine, control state and ASGI ``app``."""

    def __init__(self, config: OpenAIConfig | None = None) -> None:
        self.config = config or OpenAIConfig()
        self.engine = Engine(
            self.config.max_num_seqs, self.config.step_base_s, self.config.step_per_seq_s
        )
        self.lengths = LengthDistribution(self.config.output_len, self.config.seed)
        self.control = Control()
        self.created = int(time.time())
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            *self.control.routes(self.stats),
        ]
        self.app = ConnectionControl(Starlette(routes=routes))

    # --- helpers -----------------------------------------------------------------------
    def error_body(self, status: int, message: str, param: str | None = None) -> dict[str, Any]:
        """vLLM's ErrorResponse: flat (up to v0.10) or nested under "error" (later, OpenAI)."""
        body = {
            "message": message,
            "type": _ERROR_TYPES.get(status, "BadRequestError"),
            "param": param,
            "code": status,
        }
        if self.config.error_format == "nested":
            return {"error": body}
        return {"object": "error", **body}

    def error(self, status: int, message: str, param: str | None = None) -> JSONResponse:
        return JSONResponse(self.error_body(status, message, param), status_code=status)

    def stats(self) -> dict[str, Any]:
        e = self.engine
        return {"running": len(e.running), "waiting": len(e.waiting), "steps": e.steps}

    # --- routes ------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.config.model,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.config.model,
            "parent": None,
            "max_model_len": self.config.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def chat_completions(self, request: Request) -> Response:
        if self.config.api_key and (
            request.headers.get("authorization") != f"Bearer {self.config.api_key}"
        ):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        try:
            body = await read_json(request)
        except ValueError as exc:
            return self.error(400, str(exc))
        rec = self.control.record(request, body)
        fault = self.control.take_fault()
        if fault is not None:
            if fault.latency_s:
                await asyncio.sleep(fault.latency_s)
            injected = fault_response(fault, rec, lambda s: self.error_body(s, "injected fault"))
            if injected is not None:
                return injected
        response = self._validate(body)
        if response is not None:
            rec.status, rec.ended_at = response.status_code, time.time()
            return response
        messages = body["messages"]
        prompt_tokens = count_prompt_tokens(messages)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is None:
            max_tokens = self.config.max_model_len - prompt_tokens
        stop = body.get("stop") or []
        response_format = body.get("response_format") or {"type": "text"}
        tool_call = plan_tool_call(
            messages, body.get("tools"), body.get("tool_choice"), body.get("seed")
        )
        reply = tool_call or plan_reply(
            messages,
            self.lengths.draw(),
            max_tokens,
            seed=body.get("seed"),
            stop=[stop] if isinstance(stop, str) else list(stop),
            json_schema=(response_format.get("json_schema") or {}).get("schema")
            or response_format["type"] == "json_object",
        )
        reply = with_reasoning(reply, self.config.reasoning_tokens, max_tokens)
        model = body.get("model") or self.config.model
        meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, prompt_tokens)
        drop_after = fault.after_tokens if fault and fault.drop == "mid_stream" else None
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return TokenStream(
                lambda: self._sse(meta, reply, rec, include_usage),
                "text/event-stream",
                rec,
                drop_after=drop_after,
            )
        return await self._complete(request, meta, reply, rec)

    def _validate(self, body: Any) -> Response | None:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return self.error(400, "Field required: messages", "messages")
        if not body["messages"]:
            return self.error(400, "messages must not be empty", "messages")
        model = body.get("model")
        if model is not None and model != self.config.model:
            return self.error(404, f"The model `{model}` does not exist.", "model")
        response_format = body.get("response_format")
        if response_format is not None:
            kind = response_format.get("type") if isinstance(response_format, dict) else None
            if kind not in ("text", "json_object", "json_schema"):
                return self.error(
                    400, "response_format.type must be text, json_object or json_schema",
                    "response_format",
                )  # fmt: skip
            schema = (response_format.get("json_schema") or {}).get("schema")
            if kind == "json_schema" and not isinstance(schema, dict):
                return self.error(400, "json_schema.schema is required", "response_format")
        tools_problem = self._tools_problem(body.get("tools"), body.get("tool_choice"))
        if tools_problem:
            return self.error(400, tools_problem, "tools")
        limit = self.config.max_model_len
        prompt = count_prompt_tokens(body["messages"])
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if prompt >= limit:
            return self.error(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt} tokens in the messages, Please reduce the length of the "
                "messages.",
            )
        if max_tokens is not None and prompt + max_tokens > limit:
            return self.error(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt + max_tokens} tokens ({prompt} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages "
                "or completion.",
            )
        return None

    @staticmethod
    def _tools_problem(tools: Any, choice: Any) -> str | None:
        """vLLM's checks (served with ``--enable-auto-tool-choice``), with its messages."""
        if tools is not None and not (
            isinstance(tools, list)
            and all(isinstance(t, dict) and (t.get("function") or {}).get("name") for t in tools)
        ):
            return "tools must be a list of {type: function, function: {name, ...}}"
        if choice not in (None, "none") and not tools:
            return "When using `tool_choice`, `tools` must be set."
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if name not in {t["function"]["name"] for t in tools or ()}:
                return f"Tool '{name}' has not been passed in `tools`."
        return None

    async def _tokens(self, reply: Reply, rec: RequestRecord) -> AsyncIterator[list[str]]:
        """Batches of new tokens as the engine steps; aborts the sequence if not consumed."""
        if self.config.zero_latency:
            rec.scheduled_at = time.time()
            rec.completion_tokens = len(reply.tokens)
            if reply.tokens:
                yield reply.tokens
            return
        seq: Sequence = self.engine.submit(reply)
        sent = 0
        try:
            while new := await seq.new_tokens(sent):
                if rec.scheduled_at is None and seq.scheduled_at is not None:
                    rec.scheduled_at = time.time() - (time.monotonic() - seq.scheduled_at)
                sent += len(new)
                rec.completion_tokens = sent
                yield new
        finally:
            if not seq.finished:
                self.engine.abort(seq)

    async def _sse(
        self, meta: _Meta, reply: Reply, rec: RequestRecord, include_usage: bool
    ) -> AsyncIterator[bytes]:
        # As vLLM: nothing (not even the role chunk) until the engine has run the request.
        role = _sse(meta.chunk({"role": "assistant", "content": ""}))
        total = len(reply.tokens)
        sent = 0
        async for batch in self._tokens(reply, rec):
            out = [role] if sent == 0 else []
            if sent == 0 and reply.tool:  # as vLLM's tool parsers: the call's name, then
                out.append(_sse(meta.chunk({"tool_calls": [meta.tool_call(reply.tool)]})))
            for token in batch:  # its arguments piece by piece
                sent += 1
                finish = reply.finish_reason if sent == total else None
                if reply.tool:
                    delta = {"tool_calls": [{"index": 0, "function": {"arguments": token}}]}
                else:  # thought first, as vLLM's reasoning parsers split it
                    delta = {"reasoning" if sent <= reply.reasoning else "content": token}
                out.append(_sse(meta.chunk(delta, finish)))
            yield b"".join(out)
        if total == 0:
            yield role + _sse(meta.chunk({"content": ""}, reply.finish_reason))
        if include_usage:
            yield _sse(meta.usage_chunk(total))
        yield b"data: [DONE]\n\n"

    async def _complete(
        self, request: Request, meta: _Meta, reply: Reply, rec: RequestRecord
    ) -> Response:
        async def drain() -> None:
            async for _ in self._tokens(reply, rec):
                pass

        disconnected, _ = await until_disconnect(drain(), request.receive)
        rec.ended_at = time.time()
        if disconnected:
            rec.client_closed = True
            return Response(status_code=499)
        rec.status = 200
        n = len(reply.tokens)
        return JSONResponse(
            {
                "id": meta.id,
                "object": "chat.completion",
                "created": meta.created,
                "model": meta.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": None if reply.tool else reply.answer,
                            "reasoning": reply.thought or None,
                            "tool_calls": [meta.called(reply.tool, reply.text)] if reply.tool else [],
                        },
                        "logprobs": None,
                        "finish_reason": reply.finish_reason,
                        "stop_reason": None,
                    }
                ],
                "usage": meta.usage(n),
                "prompt_logprobs": None,
            }
        )


@dataclass(frozen=True)
class _Meta:
    id: str
    created: int
    model: str
    prompt_tokens: int

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def tool_call(self, name: str) -> dict[str, Any]:
        """The first delta of a streamed tool call (its id is the request's)."""
        call_id = "chatcmpl-tool-" + self.id.removeprefix("chatcmpl-")
        return {"id": call_id, "type": "function", "index": 0, "function": {"name": name}}

    def called(self, name: str, arguments: str) -> dict[str, Any]:
        """A whole tool call, as a non-streamed answer's ``message.tool_calls[]``."""
        call = {k: v for k, v in self.tool_call(name).items() if k != "index"}
        return call | {"function": {"name": name, "arguments": arguments}}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(completion_tokens),
        }


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.standins.openai_server --port N [options]``."""
    from tests.standins.server_thread import run_stand_in

    run_stand_in(lambda config: OpenAIStandIn(config).app, OpenAIConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
