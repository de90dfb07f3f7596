"""Next-token choice from one row of logits: greedy, or temperature / top-k / top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; ``temperature == 0`` is greedy, ``top_k == 0`` disables top-k."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


class Sampler:
    """Picks tokens for one sequence; its own RNG makes a seeded run reproducible."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < x.size:
            idx = np.argpartition(-x, p.top_k - 1)[: p.top_k]
        else:
            idx = np.arange(x.size)
        cand = x[idx]
        if p.top_p < 1.0:
            order = np.argsort(-cand, kind="stable")
            idx, cand = idx[order], cand[order]
        probs = np.exp(cand - cand.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            idx, probs = idx[:keep], probs[:keep] / probs[:keep].sum()
        choice = int(np.searchsorted(np.cumsum(probs), self.rng.random() * probs.sum()))
        return int(idx[min(choice, idx.size - 1)])


GREEDY = SamplingParams()
"""Default parameters: argmax decoding."""
