"""LongRoPE: a sequence crossing original_max_position_embeddings (64 here) is recomputed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runtimes.onnx import OnnxRuntime
from runtimes.onnx.rope import longrope_threshold
from tests.onnx.helpers import chat, hf_greedy_nocache


@pytest.fixture(scope="module")
def phi3(phi3_genai: Path):
    rt = OnnxRuntime(phi3_genai, max_batch=4, max_length=160, prefill_chunk=16)
    rt.load()
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def phi3_torch(phi3_hf: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(phi3_hf).eval()


def test_threshold_read_from_config_and_graph(phi3, phi3_genai, tmp_path):
    assert phi3.load().decoder.threshold == 64
    bare = tmp_path / "bare"  # a genai folder without config.json: read the rope If
    shutil.copytree(phi3_genai, bare)
    (bare / "config.json").unlink()
    assert longrope_threshold(bare, {}) == 64


def test_crossing_matches_full_recompute(phi3, phi3_torch, phi3_genai):
    """Tokens after the crossing equal transformers run without a cache (long factors
    everywhere); a decoder that does not re-prefill drifts."""
    ids = chat(phi3, "A train travels 240 km in 3 hours. If it increases")
    assert len(ids) < 64 < len(ids) + 40
    ref = hf_greedy_nocache(phi3_torch, ids, 40)
    assert phi3.generate_ids(ids, 40, ignore_eos=True).token_ids == ref

    naive = OnnxRuntime(phi3_genai, max_batch=1, max_length=160)
    naive.load().decoder.threshold = None  # keep the short-factor keys: the silent bug
    try:
        assert naive.generate_ids(ids, 40, ignore_eos=True).token_ids != ref
    finally:
        naive.close()


def test_long_and_short_rows_in_one_batch(phi3, phi3_torch):
    """A long prompt (chunked prefill past 64), a crossing one and a short one together."""
    cases = [
        (chat(phi3, "A train travels 240 km in 3 hours. If it increases"), 40),
        (chat(phi3, "A train travels 240 km in 3 hours. If it increases its speed by "
                    "20 km/h, how long would the same journey take? Think step by step"), 20),
        (chat(phi3, "Hi"), 50),
    ]
    assert len(cases[1][0]) > 64
    jobs = [phi3.submit_ids(i, max_new_tokens=n, ignore_eos=True) for i, n in cases]
    for (ids, n), job in zip(cases, jobs, strict=True):
        assert job.future.result().token_ids == hf_greedy_nocache(phi3_torch, ids, n)
