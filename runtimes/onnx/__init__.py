"""The in-worker ONNX Runtime decoder (genai and transformers/Optimum layouts)."""

from runtimes.onnx.job import GenerationResult
from runtimes.onnx.runtime import OnnxRuntime
from runtimes.onnx.sampling import SamplingParams

__all__ = ["GenerationResult", "OnnxRuntime", "SamplingParams"]
