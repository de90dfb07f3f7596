"""Tiny models for the ONNX decoder tests, built once and cached under .pytest_cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from runtimes.onnx import OnnxRuntime
from tests.onnx.models import build_hf_model, export_genai, export_optimum

VERSION = "v1"  # bump when the fixture models change


def _cached(request: pytest.FixtureRequest, name: str, build) -> Path:
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        root = Path(cache.mkdir(f"reasonq-onnx-{VERSION}"))
    else:
        root = request.getfixturevalue("tmp_path_factory").getbasetemp() / "reasonq-onnx"
    out = root / name
    if not (out / ".done").exists():
        out.mkdir(parents=True, exist_ok=True)
        build(out, root)
        (out / ".done").touch()
    return out


@pytest.fixture(scope="session")
def llama_hf(request: pytest.FixtureRequest) -> Path:
    return _cached(request, "llama_hf", lambda out, _: build_hf_model("llama", out, seed=0))


@pytest.fixture(scope="session")
def phi3_hf(request: pytest.FixtureRequest) -> Path:
    return _cached(request, "phi3_hf", lambda out, _: build_hf_model("phi3", out, seed=1))


@pytest.fixture(scope="session")
def llama_genai(request: pytest.FixtureRequest, llama_hf: Path) -> Path:
    return _cached(request, "llama_genai", lambda o, r: export_genai(llama_hf, o, r / "cache"))


@pytest.fixture(scope="session")
def llama_optimum(request: pytest.FixtureRequest, llama_hf: Path) -> Path:
    return _cached(request, "llama_optimum", lambda o, _: export_optimum(llama_hf, o))


@pytest.fixture(scope="session")
def phi3_genai(request: pytest.FixtureRequest, phi3_hf: Path) -> Path:
    return _cached(request, "phi3_genai", lambda o, r: export_genai(phi3_hf, o, r / "cache"))


@pytest.fixture(scope="session")
def llama_torch(llama_hf: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_hf).eval()


@pytest.fixture(scope="session", params=["genai", "optimum"])
def llama_rt(request: pytest.FixtureRequest) -> Iterator[OnnxRuntime]:
    """A warm runtime on the tiny Llama, once per layout."""
    folder = request.getfixturevalue(f"llama_{request.param}")
    rt = OnnxRuntime(folder, max_batch=4, max_length=160, prefill_chunk=16)
    rt.load()
    yield rt
    rt.close()
