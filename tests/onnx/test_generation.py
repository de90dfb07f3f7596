"""Sampling, stop conditions, cancel, context overflow, streaming and the async API."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import ContextTooLong
from runtimes.base import GenerationRequest
from runtimes.onnx import SamplingParams
from runtimes.onnx.job import Job
from runtimes.onnx.streaming import TextStream
from tests.onnx.helpers import PROMPTS, chat


def _ids(rt):
    return chat(rt, PROMPTS[1])


def test_seeded_sampling_is_reproducible(llama_rt):
    ids = _ids(llama_rt)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = llama_rt.submit_ids(ids, max_new_tokens=30, params=params, ignore_eos=True)
    b = llama_rt.submit_ids(ids, max_new_tokens=30, params=params, ignore_eos=True)
    other = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=8)
    c = llama_rt.generate_ids(ids, 30, params=other, ignore_eos=True)
    assert a.future.result().token_ids == b.future.result().token_ids
    assert c.token_ids != a.future.result().token_ids
    greedy = llama_rt.generate_ids(ids, 30, ignore_eos=True).token_ids
    top1 = SamplingParams(temperature=0.7, top_k=1, seed=1)
    assert llama_rt.generate_ids(ids, 30, params=top1, ignore_eos=True).token_ids == greedy


def test_max_tokens_and_stop_string(llama_rt):
    ids = _ids(llama_rt)
    full = llama_rt.generate_ids(ids, 30, ignore_eos=True)
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    stop = full.text[12:15]
    pieces: list[str] = []
    res = llama_rt.generate_ids(ids, 30, stop=[stop], ignore_eos=True, on_token=pieces.append)
    assert res.finish_reason == "stop"
    assert res.text == full.text[: full.text.index(stop)]
    assert "".join(pieces) == res.text  # never streamed part of the stop string


def test_eos_ends_the_sequence(llama_rt):
    ids = _ids(llama_rt)
    full = llama_rt.generate_ids(ids, 20, ignore_eos=True).token_ids
    eos = full[6]
    job = Job(ids, llama_rt.tokenizer, max_new_tokens=20, eos_ids=frozenset({eos}))
    res = llama_rt.load().submit(job).future.result()
    assert res.finish_reason == "stop"
    assert res.token_ids == full[: full.index(eos)]


def test_cancel_stops_between_steps(llama_rt):
    seen: list[str] = []
    res = llama_rt.generate_ids(
        _ids(llama_rt), 100, ignore_eos=True, on_token=seen.append,
        is_cancelled=lambda: len(seen) >= 5,
    )
    assert res.finish_reason == "cancelled"
    assert 5 <= len(res.token_ids) < 100


def test_prompt_longer_than_context(llama_rt):
    with pytest.raises(ContextTooLong, match=r"200 tokens.*at most 159"):
        llama_rt.submit_ids([5] * 200, max_new_tokens=4)
    # a prompt that fits ends with "length" when the cache is full
    res = llama_rt.generate_ids([5] * 150, 50, ignore_eos=True)
    assert res.finish_reason == "length" and len(res.token_ids) == 10


def test_streaming_handles_multibyte_pieces(llama_rt):
    tok = llama_rt.tokenizer
    text = "Café 東京 😀 Grüße! naïve"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_async_generate_batches_concurrent_requests(llama_rt):
    requests = [
        GenerationRequest(messages=[{"role": "user", "content": p}], max_tokens=12)
        for p in PROMPTS
    ]

    async def main():
        return await asyncio.gather(*(llama_rt.generate(r) for r in requests))

    results = asyncio.run(main())
    for req, got in zip(requests, results, strict=True):
        alone = llama_rt.generate_sync(req)
        assert got.text == alone.text and got.completion_tokens == alone.completion_tokens
        assert got.model == llama_rt.model_dir.name
        assert got.prompt_tokens == len(llama_rt.encode_chat(req.messages))
        assert got.time_to_first_token_s is not None and got.time_to_first_token_s > 0


def test_from_settings(llama_genai):
    from core.settings import Settings
    from runtimes.onnx import OnnxRuntime

    rt = OnnxRuntime.from_settings(Settings(onnx_model=str(llama_genai), onnx_max_batch=3))
    assert (rt.name, rt.model_dir, rt.max_batch) == ("onnx", llama_genai, 3)
    assert rt._engine is None  # nothing loaded before the first generate
