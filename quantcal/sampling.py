"""Choosing the next token from logits: greedy, or sampled as Hugging Face ``generate``
samples (temperature, then top-k, then top-p, then one draw).

Pure functions of one position's logits; the only state is the sampler's random generator,
seeded for repeatable draws. Reads and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quantcal.errors import QuantcalError


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. ``temperature`` 0 is greedy (the default); above 0, tokens are
    drawn from the softmax of ``logits / temperature`` restricted to the ``top_k`` most
    likely (0: all) and then to the smallest set whose probability reaches ``top_p``.
    ``seed`` makes the draws repeatable (None: fresh randomness)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise QuantcalError(f"--temperature must be 0 (greedy) or above, got "
                                f"{self.temperature:g}")
        if self.top_k < 0:
            raise QuantcalError(f"--top-k must be 0 (off) or more, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QuantcalError(f"--top-p must be above 0 and at most 1, got {self.top_p:g}")
        if self.greedy and (self.top_k or self.top_p < 1):
            raise QuantcalError("--top-k and --top-p filter sampling, which --temperature 0 "
                                "(greedy, the default) does not do; pass --temperature above "
                                "0, e.g. 0.7")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_probs(logits: np.ndarray, temperature: float, top_k: int = 0,
                   top_p: float = 1.0) -> np.ndarray:
    """The distribution a draw comes from, ``(V,)`` float64 summing to 1, zero outside the
    kept tokens. ``logits``: ``(V,)``. Top-k keeps every token tied with the k-th; top-p
    keeps the most likely tokens until their probability reaches ``top_p`` (at least one),
    both as transformers' TopKLogitsWarper and TopPLogitsWarper."""
    scores = np.asarray(logits, dtype=np.float64) / temperature  # (V,)
    if 0 < top_k < scores.size:
        kth = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-probs, kind="stable")  # most likely first
        before = np.cumsum(probs[order]) - probs[order]  # mass of the more likely ones
        drop = order[before >= top_p]
        probs[drop] = 0.0
        probs /= probs.sum()
    return probs


class Sampler:
    """Picks one token per call from ``(V,)`` logits under a :class:`Sampling`."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.generator = torch.Generator()
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)

    def __call__(self, logits: np.ndarray) -> int:
        s = self.sampling
        if s.greedy:
            return int(np.argmax(logits))
        probs = torch.from_numpy(filtered_probs(logits, s.temperature, s.top_k, s.top_p))
        return int(torch.multinomial(probs, 1, generator=self.generator))
