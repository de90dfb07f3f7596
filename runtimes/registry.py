"""Runtimes by name, built from settings on first use (imports stay lazy: the ONNX runtime
pulls in onnxruntime and transformers, which HTTP-only workers never need)."""

from __future__ import annotations

import importlib

from core.settings import Settings
from runtimes.base import Runtime

RUNTIMES: dict[str, str] = {
    "vllm": "runtimes.vllm:VLLMRuntime",
    "ollama": "runtimes.ollama:OllamaRuntime",
    "onnx": "runtimes.onnx:OnnxRuntime",
}


def create_runtime(name: str, settings: Settings) -> Runtime:
    module_name, class_name = RUNTIMES[name].split(":")
    runtime_class = getattr(importlib.import_module(module_name), class_name)
    return runtime_class.from_settings(settings)
