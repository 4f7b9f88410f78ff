"""Exact rejection sampling for speculative decoding.

Leviathan et al. 2023 (arXiv 2211.17192), Chen et al. 2023 (arXiv 2302.01318). For each
draft token x_i drawn from the draft distribution q_i:

* **accepted** with probability min(1, p_i(x_i) / q_i(x_i)), p_i being the target's
  distribution at that position;
* at the first rejection, a **recovered** token is drawn from norm(max(0, p_i - q_i)) and
  the rest of the draft is discarded;
* when all k drafts are accepted, a **bonus** token is drawn from p_{k+1}.

The committed tokens are then distributed exactly as if sampled from p alone. Greedy
decoding is the limit where p is one-hot: accept while the draft equals the argmax, then
emit the argmax. A deterministic drafter (n-gram) is a one-hot q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.core.rng import Purpose, sample_index, uniform
from specdec.core.sampling import SamplingParams, probs_from_logits


@dataclass
class RejectionInput:
    target_logits: torch.Tensor  # [k + 1, vocab] raw logits at the draft positions and one past
    draft_tokens: list[int]  # [k]
    draft_probs: torch.Tensor | None  # [k, vocab] float64 q, or None for a one-hot draft
    sampling: SamplingParams
    first_position: int  # absolute position of draft_tokens[0] in the sequence


@dataclass
class RejectionOutput:
    num_accepted: int  # leading draft tokens kept
    tokens: list[int]  # accepted drafts + one recovered or bonus token


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, token: int) -> float:
    """min(1, p(x)/q(x)); a draft the drafter could not have drawn (q(x)=0) is rejected."""
    qx = float(q[token])
    return 0.0 if qx <= 0 else min(1.0, float(p[token]) / qx)


def recovery_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)); equals p when p == q (then rejection has probability 0)."""
    residual = torch.clamp(p - q, min=0.0)
    total = residual.sum()
    return p if total <= 0 else residual / total


def one_hot(token: int, vocab: int) -> torch.Tensor:
    q = torch.zeros(vocab, dtype=torch.float64)
    q[token] = 1.0
    return q


def rejection_sample(item: RejectionInput) -> RejectionOutput:
    """Verify one sequence's draft."""
    k = len(item.draft_tokens)
    assert item.target_logits.shape[0] == k + 1, "need logits for k drafts plus one"
    if item.sampling.greedy:
        return _greedy(item.target_logits, item.draft_tokens)
    p = probs_from_logits(item.target_logits, item.sampling)
    seed, pos0 = item.sampling.seed, item.first_position
    vocab = p.shape[-1]
    for i, x in enumerate(item.draft_tokens):
        q = item.draft_probs[i] if item.draft_probs is not None else one_hot(x, vocab)
        if uniform(seed, pos0 + i, Purpose.ACCEPT) < acceptance_probability(p[i], q, x):
            continue
        recovered = sample_index(recovery_distribution(p[i], q), uniform(seed, pos0 + i, Purpose.RESAMPLE))
        return RejectionOutput(i, [*item.draft_tokens[:i], recovered])
    bonus = sample_index(p[k], uniform(seed, pos0 + k, Purpose.RESAMPLE))
    return RejectionOutput(k, [*item.draft_tokens, bonus])


def _greedy(logits: torch.Tensor, draft: list[int]) -> RejectionOutput:
    argmax = logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(draft) and draft[accepted] == argmax[accepted]:
        accepted += 1
    return RejectionOutput(accepted, [*draft[:accepted], argmax[accepted]])
