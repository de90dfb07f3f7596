"""Our decoder on the real default model, SmolLM2-135M-Instruct (``reasonq fetch-default-model``).

fp32: greedy output == transformers' greedy output on the Hugging Face folder it was
converted from. int4: greedy output == onnxruntime-genai's ``Generator`` on the same files.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtimes.onnx.default_model import MARKER, model_dir

FOLDERS = {v: model_dir(v) for v in ("hf", "fp32", "int4")}
NEW_TOKENS = 40
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "A train travels 240 km in 3 hours. What is its average speed?",
    (
        "All cats are mammals. Some mammals are carnivores. Can we conclude that some cats are "
        "carnivores?"
    ),
]


def _needs(*variants: str, flag: str = ""):
    missing = [v for v in variants if not (FOLDERS[v] / MARKER).is_file()]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"SmolLM2 {'/'.join(missing)} not converted: run "
        f"`reasonq fetch-default-model{flag}`",
    )


needs_fp32 = _needs("hf", "fp32")
needs_int4 = _needs("int4", flag=" --precision int4")


@pytest.fixture(scope="module")
def fp32():
    from runtimes.onnx import OnnxRuntime

    runtime = OnnxRuntime(FOLDERS["fp32"], max_batch=4, max_length=1024)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def int4():
    from runtimes.onnx import OnnxRuntime

    runtime = OnnxRuntime(FOLDERS["int4"], max_batch=4, max_length=1024)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(FOLDERS["hf"]).eval()


def _ours(runtime, prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy ids without the EOS)."""
    ids = runtime.encode_chat([{"role": "user", "content": prompt}])
    return ids, runtime.generate_ids(ids, NEW_TOKENS).token_ids


def _without_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


@needs_fp32
@pytest.mark.parametrize("prompt", PROMPTS)
def test_fp32_greedy_matches_transformers(fp32, hf_model, prompt):
    import torch

    ids, ours = _ours(fp32, prompt)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    eos = set(fp32.layout.eos_ids)
    assert ours == _without_eos(out[0, len(ids) :].tolist(), eos)


@needs_fp32
def test_fp32_knows_paris(fp32):
    from runtimes.base import GenerationRequest

    request = GenerationRequest([{"role": "user", "content": PROMPTS[0]}], max_tokens=NEW_TOKENS)
    completion = fp32.generate_sync(request)
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"


@needs_int4
@pytest.mark.parametrize("prompt", PROMPTS)
def test_int4_greedy_matches_genai(int4, prompt):
    import onnxruntime_genai as og

    ids, ours = _ours(int4, prompt)
    model = og.Model(str(FOLDERS["int4"]))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    assert ours == _without_eos(theirs, set(int4.layout.eos_ids))


GGUF = FOLDERS["hf"].parent.parent / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(
    not GGUF.is_file(), reason=f"{GGUF} not fetched: run reasonq fetch-default-model"
)
def test_convert_from_gguf_file(tmp_path):
    """``reasonq convert file.gguf``: dequantized, built, and complete with its side files."""
    import onnxruntime_genai as og

    from runtimes.onnx.convert import main

    out = tmp_path / "smollm2"
    assert main([str(GGUF), "-o", str(out), "--max-length", "2048"]) == 0
    for name in ("genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob("*.partial"))
    og.Model(str(out))


@needs_int4
@needs_fp32
def test_fetch_default_model_is_idempotent(capsys):
    import time

    from runtimes.onnx.default_model import main

    start = time.monotonic()
    assert main(["--precision", "int4"]) == 0
    assert time.monotonic() - start < 5
    assert "nothing to do" in capsys.readouterr().out
