"""Reference generations with transformers, for comparing against the ONNX decoder."""

from __future__ import annotations

PROMPTS = [
    "Hi",
    "A train travels 240 km in 3 hours. If it increases its speed by 20 km/h, how long?",
    "All cats are mammals. Café 東京",
]


def hf_greedy(model, ids: list[int], n: int, eos: frozenset[int]) -> list[int]:
    """``generate(do_sample=False)`` tokens, cut before the first end-of-sequence token."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    tokens = out[0, len(ids) :].tolist()
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def hf_greedy_nocache(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from full forward passes: every position rotated for the full length."""
    import torch

    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
    return seq[len(ids) :]


def chat(rt, content: str) -> list[int]:
    return rt.encode_chat([{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": content}])
