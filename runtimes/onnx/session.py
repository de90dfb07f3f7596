"""Open an onnxruntime session: provider choice and thread counts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import onnxruntime as ort

log = logging.getLogger(__name__)

Provider = Literal["auto", "cpu", "cuda"]


def choose_providers(provider: Provider) -> list[str]:
    """CUDA first when asked for (or ``auto``) and onnxruntime-gpu offers it, then CPU."""
    available = ort.get_available_providers()
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError(f"onnx_provider=cuda but onnxruntime offers only {available}")
    if provider != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(
    path: Path,
    provider: Provider = "auto",
    intra_op_threads: int = 0,
    inter_op_threads: int = 1,
    thread_spinning: bool = True,
) -> ort.InferenceSession:
    """Load ``path`` with full graph optimisation; 0 intra-op threads = one per core."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spin-waiting between ops makes short decode steps faster on idle cores (int4 SmolLM2:
    # 3.5 vs 4.9 ms a step) but burns cores shared with busy processes (fp32: 32-36 vs 18 ms
    # a step under a load of 3-5 on 2 cores).
    spin = "1" if thread_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    session = ort.InferenceSession(str(path), opts, providers=choose_providers(provider))
    log.info(
        "onnx session %s on %s (intra-op %s, inter-op %s threads)",
        path,
        session.get_providers()[0],
        intra_op_threads or "all",
        inter_op_threads,
    )
    return session
