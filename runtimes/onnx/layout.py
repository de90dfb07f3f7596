"""What an ONNX decoder folder looks like: tensor names, KV shapes, dtypes, limits.

Two layouts are read, never assumed:

* **genai** (onnxruntime-genai model builder, Microsoft's ``*-onnx`` repos): ``genai_config.json``
  names the tensors; no ``position_ids`` input (GroupQueryAttention derives positions from
  the attention mask, batches are right-padded); past and present share one static buffer.
* **optimum** (transformers / Optimum decoder-with-past): names found on the session;
  explicit ``position_ids``; the past grows by one column per step, batches are left-padded.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from runtimes.onnx.rope import longrope_threshold

log = logging.getLogger(__name__)

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bfloat16)": np.float32,  # no numpy bfloat16; such models are refused below
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass(frozen=True)
class ModelLayout:
    """Everything the decoder needs to know about one model folder."""

    folder: Path
    kind: Literal["genai", "optimum"]
    input_ids: str
    attention_mask: str
    position_ids: str | None
    logits: str
    past_names: tuple[str, ...]  # key, value of layer 0, then layer 1, ...
    present_names: tuple[str, ...]
    kv_heads: int
    head_dim: int
    kv_dtype: type
    logits_dtype: type
    vocab_size: int
    mask_dtype: type
    context_length: int
    eos_ids: frozenset[int]
    pad_id: int
    longrope_threshold: int | None

    @property
    def num_layers(self) -> int:
        return len(self.past_names) // 2


def model_file(folder: Path) -> Path:
    """The decoder's ``.onnx`` file: genai_config's filename, else model.onnx / decoder_*."""
    cfg = _json(folder / "genai_config.json")
    if cfg:
        return folder / cfg["model"]["decoder"]["filename"]
    for name in ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx"):
        if (folder / name).exists():
            return folder / name
    found = sorted(folder.glob("*.onnx")) + sorted(folder.glob("onnx/*.onnx"))
    if not found:
        raise FileNotFoundError(f"no .onnx model in {folder}")
    return found[0]


def read_layout(folder: Path, session: ort.InferenceSession) -> ModelLayout:
    """Read the layout of ``folder`` from its config files and the loaded session."""
    genai = _json(folder / "genai_config.json")
    hf = _json(folder / "config.json")
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if genai:
        dec = genai["model"]["decoder"]
        names_in, names_out = dec["inputs"], dec["outputs"]
        n_layers = dec["num_hidden_layers"]
        past = _layer_names(names_in["past_key_names"], names_in["past_value_names"], n_layers)
        present = _layer_names(
            names_out["present_key_names"], names_out["present_value_names"], n_layers
        )
        ids, mask = names_in["input_ids"], names_in["attention_mask"]
        pos = names_in.get("position_ids")
        logits = names_out["logits"]
        kv_heads, head_dim = dec["num_key_value_heads"], dec["head_size"]
        context = min(
            genai["model"].get("context_length") or 1 << 30,
            genai.get("search", {}).get("max_length") or 1 << 30,
        )
    else:
        past = tuple(sorted((n for n in inputs if _PAST.match(n)), key=_layer_order))
        present = tuple(sorted((n for n in outputs if _PRESENT.match(n)), key=_layer_order))
        ids, mask, logits = "input_ids", "attention_mask", "logits"
        pos = "position_ids" if "position_ids" in inputs else None
        shape = inputs[past[0]].shape
        kv_heads = shape[1] if isinstance(shape[1], int) else hf["num_key_value_heads"]
        head_dim = shape[3] if isinstance(shape[3], int) else _hf_head_dim(hf)
        context = hf.get("max_position_embeddings") or 1 << 30
    kind: Literal["genai", "optimum"] = "optimum" if pos in inputs else "genai"
    missing = [n for n in (ids, mask, *past) if n not in inputs]
    missing += [n for n in (logits, *present) if n not in outputs]
    if missing:
        raise ValueError(f"{folder}: model lacks tensors {missing}")
    kv_type = inputs[past[0]].type
    if kv_type not in ("tensor(float)", "tensor(float16)"):
        raise ValueError(f"{folder}: KV cache type {kv_type} is not supported")
    rope = longrope_threshold(folder, hf)
    layout = ModelLayout(
        folder=folder,
        kind=kind,
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos if kind == "optimum" else None,
        logits=logits,
        past_names=past,
        present_names=present,
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        kv_dtype=_ORT_DTYPES[kv_type],
        logits_dtype=_ORT_DTYPES[outputs[logits].type],
        vocab_size=_vocab_size(outputs[logits].shape, genai, hf),
        mask_dtype=_ORT_DTYPES[inputs[mask].type],
        context_length=int(context),
        eos_ids=frozenset(_eos_ids(folder, genai, hf)),
        pad_id=_pad_id(genai, hf),
        longrope_threshold=rope,
    )
    log.info(
        "onnx model %s: %s layout, %d layers, %d kv heads x %d, kv %s, context %d, longrope %s",
        folder.name,
        kind,
        layout.num_layers,
        layout.kv_heads,
        layout.head_dim,
        np.dtype(layout.kv_dtype).name,
        layout.context_length,
        rope,
    )
    return layout


_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


def _layer_order(name: str) -> tuple[int, int]:
    layer, kind = name.split(".")[-2:]
    return int(layer), kind != "key"


def _layer_names(keys: str, values: str, n: int) -> tuple[str, ...]:
    return tuple(name for i in range(n) for name in (keys % i, values % i))


def _vocab_size(logits_shape: list, genai: dict, hf: dict) -> int:
    if isinstance(logits_shape[-1], int):
        return logits_shape[-1]
    return int(genai.get("model", {}).get("vocab_size") or hf["vocab_size"])


def _hf_head_dim(hf: dict) -> int:
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def _ids(value: object) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _eos_ids(folder: Path, genai: dict, hf: dict) -> set[int]:
    """Every end-of-sequence id any of the config files names."""
    eos = set(_ids(genai.get("model", {}).get("eos_token_id")))
    eos |= set(_ids(_json(folder / "generation_config.json").get("eos_token_id")))
    if not eos:
        eos |= set(_ids(hf.get("eos_token_id")))
    return eos


def _pad_id(genai: dict, hf: dict) -> int:
    pad = genai.get("model", {}).get("pad_token_id", hf.get("pad_token_id"))
    pad = _ids(pad)
    return pad[0] if pad else 0


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
