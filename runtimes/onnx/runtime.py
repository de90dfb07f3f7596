"""``OnnxRuntime``: the in-worker ONNX Runtime decoder behind the Runtime protocol."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ContextTooLong
from runtimes.base import CancelCheck, Completion, GenerationRequest, TokenCallback
from runtimes.onnx.decoder import make_decoder
from runtimes.onnx.job import GenerationResult, Job
from runtimes.onnx.layout import ModelLayout, model_file, read_layout
from runtimes.onnx.sampling import GREEDY, SamplingParams
from runtimes.onnx.scheduler import Engine
from runtimes.onnx.session import Provider, open_session

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)


class OnnxRuntime:
    """Generates in-process with onnxruntime; one instance (one engine thread) per process.

    The model, tokenizer and KV buffers are loaded on first use and kept warm. Concurrent
    ``generate`` calls share forward passes (continuous batching, up to ``max_batch``).
    ``on_token`` and ``is_cancelled`` are called from the engine thread, not the event loop.
    """

    name = "onnx"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        provider: Provider = "auto",
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        thread_spinning: bool = True,
        max_batch: int = 8,
        max_length: int = 4096,
        prefill_chunk: int = 512,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.provider = provider
        self.threads = (intra_op_threads, inter_op_threads, thread_spinning)
        self.max_batch, self.max_length, self.prefill_chunk = max_batch, max_length, prefill_chunk
        self.layout: ModelLayout | None = None
        self.tokenizer: Any = None
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> OnnxRuntime:
        """The runtime configured by ``REASONQ_ONNX_*`` settings (nothing loaded yet)."""
        if settings is None:
            from core.settings import settings
        return cls(
            settings.onnx_model_path(),
            provider=settings.onnx_provider,
            intra_op_threads=settings.onnx_intra_op_threads,
            inter_op_threads=settings.onnx_inter_op_threads,
            thread_spinning=settings.onnx_thread_spinning,
            max_batch=settings.onnx_max_batch,
            max_length=settings.onnx_max_length,
            prefill_chunk=settings.onnx_prefill_chunk,
        )

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    def load(self) -> Engine:
        """Load model, tokenizer and engine once; later calls return the same engine."""
        with self._lock:
            if self._engine is None:
                from transformers import AutoTokenizer

                session = open_session(model_file(self.model_dir), self.provider, *self.threads)
                self.layout = layout = read_layout(self.model_dir, session)
                self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
                self.max_length = min(self.max_length, layout.context_length)
                if layout.kind == "optimum" and layout.longrope_threshold:
                    # the export traced one rope branch (short factors): cap the context there
                    log.warning(
                        "LongRoPE model in optimum layout: context capped at %d",
                        layout.longrope_threshold,
                    )
                    self.max_length = min(self.max_length, layout.longrope_threshold)
                decoder = make_decoder(
                    session, layout, self.max_batch, self.max_length, self.prefill_chunk
                )
                self._engine = Engine(decoder)
            return self._engine

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids: the chat template with the generation prompt, then the tokenizer."""
        self.load()
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit_ids(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int = 512,
        params: SamplingParams = GREEDY,
        stop: list[str] | tuple[str, ...] = (),
        ignore_eos: bool = False,
        on_token: TokenCallback | None = None,
        is_cancelled: CancelCheck | None = None,
    ) -> Job:
        """Queue a generation from prompt ids; ``job.future`` holds its GenerationResult.

        Raises ``ContextTooLong`` when the prompt leaves no room for one new token.
        """
        engine = self.load()
        room = self.max_length - len(prompt_ids)
        if room < 1:
            raise ContextTooLong(
                f"prompt is {len(prompt_ids)} tokens; model {self.model_name} takes at most "
                f"{self.max_length - 1} (KV length {self.max_length})"
            )
        job = Job(
            prompt_ids,
            self.tokenizer,
            params=params,
            max_new_tokens=min(max_new_tokens, room),
            stop=stop,
            eos_ids=self.layout.eos_ids,
            ignore_eos=ignore_eos,
            on_token=on_token,
            is_cancelled=is_cancelled,
        )
        return engine.submit(job)

    def generate_ids(
        self, prompt_ids: list[int], max_new_tokens: int, **kwargs: Any
    ) -> GenerationResult:
        """Blocking generation from prompt ids (benchmarks: pass ``ignore_eos=True``)."""
        return self.submit_ids(prompt_ids, max_new_tokens=max_new_tokens, **kwargs).future.result()

    def submit(
        self,
        request: GenerationRequest,
        on_token: TokenCallback | None = None,
        is_cancelled: CancelCheck | None = None,
    ) -> Job:
        """Queue a chat request; see ``submit_ids``."""
        params = SamplingParams(request.temperature, request.top_k, request.top_p, request.seed)
        return self.submit_ids(
            self.encode_chat(request.messages),
            max_new_tokens=request.max_tokens,
            params=params,
            stop=request.stop,
            on_token=on_token,
            is_cancelled=is_cancelled,
        )

    def generate_sync(
        self,
        request: GenerationRequest,
        on_token: TokenCallback | None = None,
        is_cancelled: CancelCheck | None = None,
    ) -> Completion:
        """Blocking ``generate`` for scripts and benchmarks."""
        return self._completion(self.submit(request, on_token, is_cancelled).future.result())

    async def warm_up(self) -> None:
        """Load the model off the event loop (seconds), so the first job doesn't wait."""
        await asyncio.get_running_loop().run_in_executor(None, self.load)

    async def generate(
        self,
        request: GenerationRequest,
        on_token: TokenCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        *,
        on_reasoning: TokenCallback | None = None,  # the decoder's thinking is its text
    ) -> Completion:
        """Run one generation, sharing forward passes with every other job in flight."""
        loop = asyncio.get_running_loop()
        # loading the model and tokenizing take seconds the first time: keep the loop free
        job = await loop.run_in_executor(None, self.submit, request, on_token, is_cancelled)
        waiter: asyncio.Future[GenerationResult] = loop.create_future()

        def transfer(done: Any) -> None:
            if waiter.done():
                return
            if done.exception() is not None:
                waiter.set_exception(done.exception())
            else:
                waiter.set_result(done.result())

        job.future.add_done_callback(lambda f: loop.call_soon_threadsafe(transfer, f))
        try:
            return self._completion(await waiter)
        except asyncio.CancelledError:
            job.cancel_requested = True  # the engine drops it at the next step
            raise

    def _completion(self, result: GenerationResult) -> Completion:
        return Completion(
            text=result.text,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=len(result.token_ids),
            model=self.model_name,
            time_to_first_token_s=result.time_to_first_token_s,
        )

    def close(self) -> None:
        """Stop the engine thread (running jobs end as cancelled) and drop the model."""
        with self._lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
