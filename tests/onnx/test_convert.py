"""``reasonq convert`` on a tiny random Llama (fixed seed, local tokenizer, no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from runtimes.onnx.convert import ConversionError, convert, main
from tests.onnx.models import build_hf_model

PROMPT = [{"role": "user", "content": "A train travels 240 km in 3 hours."}]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama-hf")
    build_hf_model("llama", folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def fp32(hf_llama, tmp_path_factory) -> Path:
    return convert(hf_llama, tmp_path_factory.mktemp("out") / "fp32", "fp32", max_length=256)


@pytest.fixture(scope="module")
def int4(hf_llama, tmp_path_factory) -> Path:
    return convert(hf_llama, tmp_path_factory.mktemp("out") / "int4", "int4")


def _op_types(folder: Path) -> set[str]:
    return {
        node.op_type
        for node in onnx.load(folder / "model.onnx", load_external_data=False).graph.node
    }


@pytest.mark.parametrize("variant", ["fp32", "int4"])
def test_output_is_a_genai_folder(variant, request):
    out = request.getfixturevalue(variant)
    for name in ("genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not out.with_name(out.name + ".partial").exists()
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["type"] == "llama"
    assert genai["model"]["decoder"]["num_hidden_layers"] == 2
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "logits" in [o.name for o in session.get_outputs()]


def test_int4_uses_matmulnbits(int4, fp32):
    assert "MatMulNBits" in _op_types(int4)
    assert "MatMulNBits" not in _op_types(fp32)


def test_max_length_goes_into_genai_config(fp32):
    assert json.loads((fp32 / "genai_config.json").read_text())["search"]["max_length"] == 256


def test_tokenizer_loads_with_transformers(fp32, hf_llama):
    from transformers import AutoTokenizer

    ours, theirs = AutoTokenizer.from_pretrained(fp32), AutoTokenizer.from_pretrained(hf_llama)
    kwargs = {"add_generation_prompt": True, "tokenize": False}
    text = theirs.apply_chat_template(PROMPT, **kwargs)
    assert ours.apply_chat_template(PROMPT, **kwargs) == text
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]


def test_fp32_greedy_matches_transformers(fp32, hf_llama):
    """The exported graph computes the same model: genai greedy == transformers greedy."""
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_llama)
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf_llama).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )
    expected = out[0, len(ids) :].tolist()

    og_model = og.Model(str(fp32))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(ids) + 12, min_length=len(ids) + 12, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    got = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    assert got == expected


def test_missing_src(tmp_path):
    with pytest.raises(ConversionError, match="no such file"):
        convert(tmp_path / "nope", tmp_path / "out")


def test_folder_without_config(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path / "src", tmp_path / "out")


def test_config_without_architectures(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConversionError, match="architectures"):
        convert(tmp_path / "src", tmp_path / "out")


def test_folder_without_weights(tmp_path, hf_llama):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text((hf_llama / "config.json").read_text())
    with pytest.raises(ConversionError, match="no weights"):
        convert(tmp_path / "src", tmp_path / "out")


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ConversionError, match=r"\.gguf"):
        convert(tmp_path / "model.bin", tmp_path / "out")


def test_corrupt_gguf(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\x07" * 60)
    with pytest.raises(ConversionError, match="not a GGUF model"):
        convert(tmp_path / "broken.gguf", tmp_path / "out")


def test_gguf_file_not_in_folder(tmp_path):
    with pytest.raises(ConversionError, match="no such GGUF"):
        convert(tmp_path, tmp_path / "out", gguf_file="missing.gguf")


def test_fp16_needs_cuda(tmp_path, hf_llama):
    with pytest.raises(ConversionError, match="--device cuda"):
        convert(hf_llama, tmp_path / "out", "fp16", "cpu")


def test_refuses_non_empty_output(tmp_path, hf_llama):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="--force"):
        convert(hf_llama, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_reports_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 1
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "-o", str(tmp_path / "out"), "--precision", "int8"])


def test_fp16_for_cuda(hf_llama, tmp_path):
    """Built on a machine without a GPU: the folder names the CUDA provider."""
    out = convert(hf_llama, tmp_path / "fp16", "fp16")
    genai = json.loads((out / "genai_config.json").read_text())
    assert "cuda" in genai["model"]["decoder"]["session_options"]["provider_options"][0]
    model = onnx.load(out / "model.onnx", load_external_data=False)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_builder_failure_is_reported_and_cleaned_up(hf_llama, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in hf_llama.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    with pytest.raises(ConversionError, match="model builder failed"):
        convert(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
