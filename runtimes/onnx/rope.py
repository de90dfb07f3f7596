"""LongRoPE (Phi-3.5 / Phi-4-mini): where the model switches from short to long factors.

A LongRoPE model rotates positions with ``short_factor`` while the sequence is at most
``original_max_position_embeddings`` long and with ``long_factor`` beyond. The genai builder
bakes both cos/sin caches into the graph and picks one with
``If(Greater(attention_mask.shape[1], original_max))``: the choice is made per forward pass
from the mask width, and keys already in the cache keep the rotation they were written with.
So when a sequence grows past the threshold its whole cache must be recomputed with the long
factors (the decoder re-prefills prompt + generated tokens, see ``decoder.GenaiDecoder``), and
rows on different sides of the threshold must never share a forward pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def longrope_threshold(folder: Path, hf_config: dict) -> int | None:
    """Sequence length above which the long factors apply, or None for other models.

    Read from ``config.json`` when the folder has one, else from the graph's rope ``If``
    (needs the optional ``onnx`` package; only genai folders without config.json need it).
    """
    scaling = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if hf_config:
        if kind != "longrope":
            return None
        original = scaling.get("original_max_position_embeddings") or hf_config.get(
            "original_max_position_embeddings"
        )
        return int(original) if original else None
    return _threshold_from_graph(folder)


def _threshold_from_graph(folder: Path) -> int | None:
    """Find ``Greater(mask_len, N)`` feeding the ``If`` that outputs ``cos_cache``."""
    from runtimes.onnx.layout import model_file

    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        log.warning("%s: no config.json and no onnx package; LongRoPE not detected", folder)
        return None
    graph = onnx.load(str(model_file(folder)), load_external_data=False).graph
    consts = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type == "If" and "cos_cache" in node.output:
            cond = producers.get(node.input[0])
            if cond is None or cond.op_type != "Greater":
                return None
            limit = producers.get(cond.input[1])
            if limit is not None and limit.op_type == "Constant":
                return int(numpy_helper.to_array(limit.attribute[0].t).reshape(-1)[0])
            if cond.input[1] in consts:
                return int(numpy_helper.to_array(consts[cond.input[1]]).reshape(-1)[0])
    return None
