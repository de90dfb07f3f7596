"""``VLLMRuntime``: vLLM's OpenAI-compatible chat completions, streamed as SSE.

One ``POST /v1/chat/completions`` per generation with ``stream: true`` and
``stream_options.include_usage``; content deltas go to ``on_token``, the token counts come
from the final usage chunk. vLLM-only sampling fields (``top_k``) ride along at the top
level, as vLLM's ``ChatCompletionRequest`` accepts them.
"""

from __future__ import annotations

import json
from typing import Any

from core.errors import BackendRejected, BackendUnavailable
from core.settings import Settings
from core.settings import settings as default_settings
from runtimes.base import FinishReason, GenerationRequest
from runtimes.http import (
    HTTPOptions,
    HTTPRuntime,
    StreamState,
    error_in_stream,
    get_json,
    optional_sampling,
)


class VLLMRuntime(HTTPRuntime):
    """Generations on a vLLM (or any OpenAI-compatible) server."""

    name = "vllm"
    path = "/v1/chat/completions"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        options: HTTPOptions | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        super().__init__(base_url, options, headers)
        self.model = model
        self._served_model: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> VLLMRuntime:
        """Built from ``REASONQ_*`` settings (the process-wide ones by default)."""
        settings = settings or default_settings
        return cls(
            settings.vllm_url,
            model=settings.vllm_model,
            api_key=settings.vllm_api_key,
            options=HTTPOptions.from_settings(settings),
        )

    async def resolve_model(self, request: GenerationRequest) -> str:
        """The request's model, else the configured one, else the first the server serves."""
        if request.model or self.model:
            return request.model or self.model  # type: ignore[return-value]
        if self._served_model is None:
            listing = await get_json(self.client, self.name, "/v1/models")
            models = listing.get("data") or []
            if not models:
                raise BackendRejected(f"{self.name} serves no model (GET /v1/models is empty)")
            self._served_model = str(models[0]["id"])
        return self._served_model

    def payload(self, request: GenerationRequest, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            **optional_sampling(request),
            **({"response_format": request.response_format} if request.response_format else {}),
            **({"tools": request.tools} if request.tools else {}),
            **({"tool_choice": request.tool_choice} if request.tool_choice else {}),
        }

    def parse_line(self, line: bytes, state: StreamState) -> None:
        if not line.startswith(b"data:"):
            return  # SSE comments, event names, keep-alive pings
        data = line[5:].strip()
        if data == b"[DONE]":
            state.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            shown = data[:200].decode("utf-8", "replace")
            raise BackendUnavailable(f"{self.name} sent a malformed chunk: {shown}") from None
        error = chunk.get("error") if "error" in chunk else None
        if error is not None or chunk.get("object") == "error":
            info = error if isinstance(error, dict) else chunk
            raise error_in_stream(self.name, str(info.get("message", error)), info.get("code"))
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            # "reasoning" since vLLM 0.11; "reasoning_content" before (still sent by some).
            if reasoning := delta.get("reasoning") or delta.get("reasoning_content"):
                state.add_reasoning(reasoning)
            if content := delta.get("content"):
                state.add(content)
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                state.add_tool_call(
                    call.get("index", 0), call.get("id"), function.get("name"),
                    function.get("arguments") or "",
                )  # fmt: skip
            if choice.get("finish_reason"):
                state.finish_reason = self._finish_reason(choice["finish_reason"])
        if usage := chunk.get("usage"):
            state.prompt_tokens = usage.get("prompt_tokens")
            state.completion_tokens = usage.get("completion_tokens")
        if chunk.get("model"):
            state.model = chunk["model"]

    def _finish_reason(self, reason: str) -> FinishReason:
        if reason == "length":
            return "length"
        if reason == "tool_calls":
            return "tool_calls"
        if reason == "abort":  # the engine dropped the request (shutdown, preemption limit)
            raise BackendUnavailable(f"{self.name} aborted the generation")
        return "stop"  # "stop", "content_filter": the model finished
