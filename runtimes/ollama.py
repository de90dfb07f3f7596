"""``OllamaRuntime``: Ollama's ``/api/chat``, streamed as NDJSON.

Sampling goes in ``options`` (``num_predict`` is max_tokens); ``keep_alive`` and
``num_ctx`` come from settings so every job keeps the same model instance loaded. The last
line (``done: true``) carries ``done_reason`` and the token counts.
"""

from __future__ import annotations

import json
from typing import Any

from core.errors import BackendUnavailable
from core.settings import Settings
from core.settings import settings as default_settings
from runtimes.base import GenerationRequest
from runtimes.http import HTTPOptions, HTTPRuntime, StreamState, error_in_stream, optional_sampling


class OllamaRuntime(HTTPRuntime):
    """Generations on an Ollama server."""

    name = "ollama"
    path = "/api/chat"

    def __init__(
        self,
        base_url: str,
        *,
        model: str = "phi4-mini",
        keep_alive: str | None = "5m",
        num_ctx: int | None = 4096,
        options: HTTPOptions | None = None,
    ) -> None:
        super().__init__(base_url, options)
        self.model = model
        self.keep_alive = keep_alive
        self.num_ctx = num_ctx

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> OllamaRuntime:
        """Built from ``REASONQ_*`` settings (the process-wide ones by default)."""
        settings = settings or default_settings
        return cls(
            settings.ollama_url,
            model=settings.ollama_model,
            keep_alive=settings.ollama_keep_alive,
            num_ctx=settings.ollama_num_ctx,
            options=HTTPOptions.from_settings(settings),
        )

    async def resolve_model(self, request: GenerationRequest) -> str:
        return request.model or self.model

    def payload(self, request: GenerationRequest, model: str) -> dict[str, Any]:
        options: dict[str, Any] = {
            "num_predict": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            **optional_sampling(request),
        }
        if self.num_ctx:
            options["num_ctx"] = self.num_ctx
        body: dict[str, Any] = {
            "model": model,
            "messages": request.messages,
            "stream": True,
            "options": options,
        }
        if request.response_format:
            body["format"] = ollama_format(request.response_format)
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        return body

    def parse_line(self, line: bytes, state: StreamState) -> None:
        try:
            obj = json.loads(line)
        except ValueError:
            shown = line[:200].decode("utf-8", "replace")
            raise BackendUnavailable(f"{self.name} sent a malformed line: {shown}") from None
        if "error" in obj:
            raise error_in_stream(self.name, str(obj["error"]))
        content = (obj.get("message") or {}).get("content")
        if content:
            state.add(content)
        if obj.get("done"):
            state.done = True
            state.finish_reason = "length" if obj.get("done_reason") == "length" else "stop"
            state.prompt_tokens = obj.get("prompt_eval_count")
            state.completion_tokens = obj.get("eval_count")


def ollama_format(response_format: dict[str, Any]) -> str | dict[str, Any]:
    """OpenAI's ``response_format`` as Ollama's ``format``: ``"json"`` or the JSON schema."""
    if response_format["type"] == "json_schema":
        return response_format["json_schema"]["schema"]
    return "json"
