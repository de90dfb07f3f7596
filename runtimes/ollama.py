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
            "messages": ollama_messages(request.messages),
            "stream": True,
            "options": options,
        }
        # Ollama has no tool_choice: "none" offers no tools; the API refuses the forcing ones.
        if request.tools and request.tool_choice != "none":
            body["tools"] = request.tools
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
        message = obj.get("message") or {}
        if thinking := message.get("thinking"):
            state.add_reasoning(thinking)
        if content := message.get("content"):
            state.add(content)
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            arguments = function.get("arguments")
            state.add_tool_call(
                len(state.tool_calls), call.get("id"), function.get("name"),
                arguments if isinstance(arguments, str) else json.dumps(arguments or {}),
            )  # fmt: skip
        if obj.get("done"):
            state.done = True
            reason = obj.get("done_reason")
            state.finish_reason = (
                "length" if reason == "length" else "tool_calls" if state.tool_calls else "stop"
            )
            state.prompt_tokens = obj.get("prompt_eval_count")
            state.completion_tokens = obj.get("eval_count")


def ollama_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages as Ollama takes them: a tool call's arguments as an object, not
    a JSON string, and a tool's answer naming its function (``tool_name``) rather than the
    call's id, which Ollama does not have."""
    names = {
        call["id"]: call["function"]["name"]
        for message in messages
        for call in message.get("tool_calls") or ()
    }
    out = []
    for message in messages:
        if calls := message.get("tool_calls"):
            converted = [
                {"function": {"name": c["function"]["name"], "arguments": _object(c["function"])}}
                for c in calls
            ]
            message = {**message, "content": message.get("content") or "", "tool_calls": converted}
        elif message.get("role") == "tool":
            name = names.get(message.get("tool_call_id") or "")
            message = {k: v for k, v in message.items() if k != "tool_call_id"}
            if name:
                message["tool_name"] = name
        out.append(message)
    return out


def _object(function: dict[str, Any]) -> Any:
    try:
        return json.loads(function.get("arguments") or "{}")
    except ValueError:  # not JSON: pass it on as the model wrote it
        return function["arguments"]


def ollama_format(response_format: dict[str, Any]) -> str | dict[str, Any]:
    """OpenAI's ``response_format`` as Ollama's ``format``: ``"json"`` or the JSON schema."""
    if response_format["type"] == "json_schema":
        return response_format["json_schema"]["schema"]
    return "json"
