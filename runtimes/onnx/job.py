"""One generation as the engine sees it: prompt ids in, sampled tokens and text out."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from runtimes.base import CancelCheck, FinishReason, TokenCallback
from runtimes.onnx.sampling import GREEDY, Sampler, SamplingParams
from runtimes.onnx.streaming import TextStream


@dataclass
class GenerationResult:
    """What one finished job produced."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    time_to_first_token_s: float | None


class Job:
    """A sequence in the engine: samples its tokens, streams its text, knows when it ends.

    ``on_token`` and ``is_cancelled`` are called from the engine thread.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        tokenizer: Any,
        *,
        params: SamplingParams = GREEDY,
        max_new_tokens: int = 512,
        stop: list[str] | tuple[str, ...] = (),
        eos_ids: frozenset[int] = frozenset(),
        ignore_eos: bool = False,
        on_token: TokenCallback | None = None,
        is_cancelled: CancelCheck | None = None,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.sampler = Sampler(params)
        self.stream = TextStream(tokenizer, stop, lazy=on_token is None)
        self.max_new_tokens = max_new_tokens
        self.eos_ids = frozenset() if ignore_eos else eos_ids
        self.on_token = on_token
        self.is_cancelled = is_cancelled
        self.cancel_requested = False  # set from any thread (an awaiting task was cancelled)
        self.generated: list[int] = []
        self.future: Future[GenerationResult] = Future()
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def cancelled(self) -> bool:
        return self.cancel_requested or bool(self.is_cancelled and self.is_cancelled())

    def accept(self, token: int) -> bool:
        """Take the next sampled token; return True when the job has ended."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.eos_ids:
            return self.finish("stop")
        self.generated.append(token)
        piece = self.stream.push(token)
        if piece and self.on_token:
            self.on_token(piece)
        if self.stream.stopped:
            return self.finish("stop")
        if len(self.generated) >= self.max_new_tokens:
            return self.finish("length")
        return False

    def finish(self, reason: FinishReason) -> bool:
        """Flush held-back text and complete the future."""
        rest = self.stream.flush()
        if rest and self.on_token:
            self.on_token(rest)
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted
        result = GenerationResult(
            self.generated, self.stream.text, reason, len(self.prompt_ids), ttft
        )
        if not self.future.done():
            self.future.set_result(result)
        return True

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
