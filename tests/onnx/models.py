"""Tiny random-weight models and a local tokenizer for the ONNX decoder tests.

Everything is built from fixed seeds, without the Hugging Face hub: a byte-level BPE
tokenizer trained on a fixed text, a Llama and a LongRoPE Phi-3 with random weights, each
saved with ``save_pretrained`` and exported to both ONNX layouts (onnxruntime-genai builder
and a transformers/Optimum-style decoder-with-past via ``torch.onnx.export``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<eos>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

_TEXT = """A train travels 240 km in 3 hours. If it increases its speed by 20 km/h, how long
would the same journey take? Compound interest on $5000 at 6% annually for 3 years.
A rectangle has length 15cm and width 8cm; increase both dimensions by 20%.
All cats are mammals. Some mammals are carnivores. Can we conclude that some cats are
carnivores? Write a Python function to calculate the Fibonacci sequence using dynamic
programming. def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)
Think step by step and show your reasoning clearly. Solve this mathematical problem.
Café, naïve, 東京, 😀 — Grüße! Ünïcödé text keeps multi-byte pieces in the vocabulary.
"""


def build_tokenizer(out: Path) -> None:
    """Train a small byte-level BPE on a fixed text and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _init_weights(model, seed: int) -> None:
    """Random weights whose greedy output varies (std large enough to avoid one token)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def build_hf_model(kind: str, out: Path, seed: int = 0) -> None:
    """Save a tiny random ``llama`` or LongRoPE ``phi3`` model plus tokenizer to ``out``."""
    import torch
    from transformers import GenerationConfig

    build_tokenizer(out)
    common = {
        "vocab_size": 400,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "eos_token_id": [1, 2],
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(max_position_embeddings=512, rope_theta=10000.0, **common)
        cls = LlamaForCausalLM
    elif kind == "phi3":
        from transformers import Phi3Config, Phi3ForCausalLM

        half = 16 // 2  # head_dim 16 -> 8 rotary frequencies
        cfg = Phi3Config(
            max_position_embeddings=1024,
            original_max_position_embeddings=64,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(half)],
                "long_factor": [2.0 + 0.5 * i for i in range(half)],
            },
            rope_theta=10000.0,
            partial_rotary_factor=1.0,
            **common,
        )
        cls = Phi3ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    _init_weights(model, seed)
    model.save_pretrained(out)
    GenerationConfig(eos_token_id=[1, 2], pad_token_id=0, bos_token_id=None).save_pretrained(out)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy tokenizer and config json files next to an exported model."""
    for f in src.iterdir():
        wanted = f.suffix in {".json", ".jinja", ".txt"} and not f.name.startswith("model")
        if wanted and not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def export_genai(hf_dir: Path, out: Path, cache: Path) -> None:
    """Run the onnxruntime-genai model builder (fp32, cpu) on a saved HF folder."""
    # the CLI prepares the options create_model() expects (hf_details and friends)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir)]
    cmd += ["-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(cache)]
    subprocess.run(cmd, check=True, capture_output=True)
    copy_tokenizer_files(hf_dir, out)


def export_optimum(hf_dir: Path, out: Path) -> None:
    """Export a decoder-with-past model in the transformers/Optimum layout.

    Inputs ``input_ids, attention_mask, position_ids, past_key_values.N.key|value``;
    outputs ``logits, present.N.key|value``; dynamic batch, sequence and past axes.
    """
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=cfg)
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            flat = []
            for i in range(n_layers):
                layer = out.past_key_values.layers[i]
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    b, s, p = 2, 3, 4
    past = [torch.randn(b, kv, p, hd) for _ in range(2 * n_layers)]
    args = (
        torch.randint(3, 100, (b, s)),
        torch.ones(b, p + s, dtype=torch.int64),
        torch.arange(p, p + s).repeat(b, 1),
        *past,
    )
    past_names, present_names, axes = [], [], {}
    for i in range(n_layers):
        for kind in ("key", "value"):
            past_names.append(f"past_key_values.{i}.{kind}")
            present_names.append(f"present.{i}.{kind}")
            axes[past_names[-1]] = {0: "batch_size", 2: "past_sequence_length"}
            axes[present_names[-1]] = {0: "batch_size", 2: "total_sequence_length"}
    axes |= {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            Wrapper(),
            args,
            str(out / "model.onnx"),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    copy_tokenizer_files(hf_dir, out)
