"""Sampling parameters and logits processing.

Temperature, top-k and top-p are applied to the target's and the drafter's logits alike,
*before* the rejection test, so both sides speak about the same distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from specdec.core.errors import InvalidArgument

MAX_TOP_K = 1 << 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # (0, 1]; 1 = off
    seed: int = 0  # keys the counter-based generator with the token position

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, prefix: str = "") -> SamplingParams:
        """Raise InvalidArgument naming the bad field; return self when valid."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(prefix + "temperature", f"must be a finite number >= 0, got {self.temperature}")
        if self.temperature > 100:
            raise InvalidArgument(prefix + "temperature", f"must be <= 100, got {self.temperature}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidArgument(prefix + "top_k", f"must be in [0, {MAX_TOP_K}], got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidArgument(prefix + "top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 1 << 64:
            raise InvalidArgument(prefix + "seed", "must fit in 64 bits")
        return self


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits [n, vocab] -> float64 probabilities [n, vocab] after temperature/top-k/top-p.

    Greedy parameters give the one-hot of the argmax, so the rejection test degenerates to
    an exact argmax match.
    """
    logits = logits.to(torch.float64)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(torch.float64)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def quantize_f16(probs: torch.Tensor) -> torch.Tensor:
    """Round a distribution to float16 and renormalise in float64.

    The drafter samples from exactly this distribution and ships the float16 bytes, so the
    target's rejection test uses the very q the draft was drawn from (exactness survives
    the wire format: both ends renormalise with `renormalised_f16`).
    """
    values = probs.detach().to(torch.float16).cpu().numpy()
    return renormalised_f16(values).to(probs.device)


def renormalised_f16(values: np.ndarray) -> torch.Tensor:
    """float16 weights [..., vocab] -> float64 probabilities summing to 1 on the last axis.

    In numpy, because the services call it on their gRPC threads, where a torch op this
    size would start a second OpenMP team (see `core.compute`)."""
    q = values.astype(np.float64)
    return torch.from_numpy(q / q.sum(axis=-1, keepdims=True))
