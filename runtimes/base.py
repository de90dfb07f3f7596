"""What every runtime speaks: a request in, a completion out, tokens streamed on the way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, already merged with its task profile (system prompt included)."""

    messages: list[dict[str, Any]]
    model: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # OpenAI's response_format (json_object or json_schema); None: free text.
    response_format: dict[str, Any] | None = None
    # OpenAI's function tools and tool_choice; None: no tools offered.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model: str
    time_to_first_token_s: float | None = None
    # As OpenAI's message.tool_calls: [{"id", "type": "function", "function": {"name",
    # "arguments" (a JSON string)}}]; None when the model called no tool.
    tool_calls: list[dict[str, Any]] | None = None
    # What a reasoning model thought before answering, when its server sends it apart
    # (vLLM's --reasoning-parser, Ollama's thinking); None otherwise.
    reasoning: str | None = None


TokenCallback = Callable[[str], None]
"""Called with each piece of generated text as it arrives."""

CancelCheck = Callable[[], bool]
"""Returns True once the job has been cancelled; checked between tokens or stream chunks."""


class Runtime(Protocol):
    """An inference backend. One instance per worker process, shared by every job it runs."""

    name: str

    async def generate(
        self,
        request: GenerationRequest,
        on_token: TokenCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        *,
        on_reasoning: TokenCallback | None = None,
    ) -> Completion:
        """Run one generation; ``on_token`` gets the answer's text as it comes,
        ``on_reasoning`` a reasoning model's thinking (where its server sends it apart).

        Raises ``core.errors.BackendUnavailable`` (retryable) or ``BackendRejected`` (final).
        When ``is_cancelled`` turns true mid-generation the runtime stops at its next token /
        chunk boundary, releases the backend's work (closes the stream) and returns what it
        has with ``finish_reason="cancelled"``.
        """
        ...

    async def warm_up(self) -> None:
        """Load what the first generation would otherwise wait for (in-process models)."""
        ...

    async def aclose(self) -> None:
        """Release clients, sessions and threads."""
        ...
