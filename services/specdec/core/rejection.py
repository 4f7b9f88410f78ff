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

`rejection_sample_batch` judges a whole verify batch in tensor ops on the logits' device
and reads back one [items, 2] tensor (accepted count, the target's own token): on an
accelerator one sync per batch instead of one per draft token. `rejection_sample` judges
one item with host reads; it is the reference the batched one must equal token for token
(same uniforms, same processing, same inverse-CDF draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.core.rng import Purpose, sample_index, uniform
from specdec.core.sampling import RowSampling, SamplingParams, probs_from_logits, probs_from_logits_rows
from specdec.core.transfer import to_device, to_device_split, to_host


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


def rejection_sample_batch(items: list[RejectionInput]) -> list[RejectionOutput]:
    """Verify many sequences' drafts at once: `rejection_sample` on each, but with one
    device->host read for the whole batch (and a few host->device copies, all made before
    the first kernel so none waits on our own work)."""
    if not items:
        return []
    greedy = [b for b, item in enumerate(items) if item.sampling.greedy]
    sampled = [b for b, item in enumerate(items) if not item.sampling.greedy]
    greedy_plan = _Layout.build([items[b] for b in greedy]) if greedy else None
    sampled_plan = _SampledLayout.build([items[b] for b in sampled]) if sampled else None
    parts = []
    if greedy_plan is not None:
        parts.append(_greedy_batch(greedy_plan))
    if sampled_plan is not None:
        parts.append(_sampled_batch(sampled_plan))
    judged = to_host(torch.cat(parts)).tolist()  # [items, 2]: the one read of the batch
    outputs: list[RejectionOutput | None] = [None] * len(items)
    for b, (num_accepted, token) in zip(greedy + sampled, judged):
        outputs[b] = RejectionOutput(num_accepted, [*items[b].draft_tokens[:num_accepted], token])
    return [out for out in outputs if out is not None]


@dataclass
class _Layout:
    """A batch's draft positions on the device, padded to the longest draft."""

    logits: list[torch.Tensor]  # [k_b + 1, vocab] per item, stacked by `stacked` once the copies are made
    rows: torch.Tensor  # [items, max_k + 1] int64: row of position i (past k_b: the item's last)
    drafts: torch.Tensor  # [items, max_k] int64: draft tokens, 0 past k_b
    num_drafts: torch.Tensor  # [items] int64: k_b
    max_k: int

    @classmethod
    def build(cls, items: list[RejectionInput]) -> _Layout:
        max_k = max(len(item.draft_tokens) for item in items)
        rows: list[int] = []
        drafts: list[int] = []
        starts = 0
        for item in items:
            k = len(item.draft_tokens)
            assert item.target_logits.shape[0] == k + 1, "need logits for k drafts plus one"
            rows += [starts + min(i, k) for i in range(max_k + 1)]
            drafts += item.draft_tokens + [0] * (max_k - k)
            starts += k + 1
        device = items[0].target_logits.device
        num = [len(item.draft_tokens) for item in items]
        flat_rows, flat_drafts, num_t = to_device_split([rows, drafts, num], torch.int64, device)
        n = len(items)
        return cls([item.target_logits for item in items], flat_rows.view(n, -1), flat_drafts.view(n, -1), num_t, max_k)

    def stacked(self) -> torch.Tensor:
        """[rows, vocab]: the items' logits in one tensor (float64 when dtypes differ: exact)."""
        dtypes = {logits.dtype for logits in self.logits}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
        return torch.cat([logits.to(dtype) for logits in self.logits])

    def valid(self) -> torch.Tensor:
        """[items, max_k] bool: the draft positions that exist."""
        return torch.arange(self.max_k, device=self.num_drafts.device)[None, :] < self.num_drafts[:, None]


def _greedy_batch(plan: _Layout) -> torch.Tensor:
    """[items, 2] int64: (accepted, argmax after them); accept while the draft is the argmax."""
    argmax = plan.stacked().argmax(dim=-1)[plan.rows]  # [items, max_k + 1]
    match = (argmax[:, : plan.max_k] == plan.drafts) & plan.valid()
    num = match.long().cumprod(dim=1).sum(dim=1)
    return torch.stack([num, argmax.gather(1, num[:, None])[:, 0]], dim=1)


@dataclass
class _SampledLayout:
    """A sampled batch: the positions, every uniform the per-item path could draw, each
    row's parameters and the drafters' q (when not one-hot), all on the device."""

    layout: _Layout
    u_accept: torch.Tensor  # [items, max_k] float64 (2.0 past k_b: never accepted)
    u_resample: torch.Tensor  # [items, max_k + 1] float64
    sampling: RowSampling  # per logits row
    q: torch.Tensor | None  # [q_rows, vocab] float64: the draft_probs given, stacked; None when all one-hot
    q_rows: torch.Tensor  # [items, max_k] int64: row of q at position i (clamped; 0 without q)
    has_q: torch.Tensor  # [items] bool

    @classmethod
    def build(cls, items: list[RejectionInput]) -> _SampledLayout:
        device = items[0].target_logits.device
        layout = _Layout.build(items)
        max_k, vocab = layout.max_k, items[0].target_logits.shape[-1]
        u_accept, u_resample, q_rows, q_start = [], [], [], 0
        for item in items:
            seed, pos0, k = item.sampling.seed, item.first_position, len(item.draft_tokens)
            u_accept += [uniform(seed, pos0 + i, Purpose.ACCEPT) if i < k else 2.0 for i in range(max_k)]
            u_resample += [uniform(seed, pos0 + i, Purpose.RESAMPLE) if i <= k else 0.0 for i in range(max_k + 1)]
            given = item.draft_probs is not None and k > 0
            q_rows += [q_start + min(i, k - 1) if given else 0 for i in range(max_k)]
            q_start += k if given else 0
        ua, ur = to_device_split([u_accept, u_resample], torch.float64, device)
        row_params = [item.sampling for item in items for _ in range(len(item.draft_tokens) + 1)]
        sampling = RowSampling.build(row_params, vocab, device)
        qr, has_q = to_device_split(
            [q_rows, [int(item.draft_probs is not None and len(item.draft_tokens) > 0) for item in items]],
            torch.int64,
            device,
        )
        given_q = [
            item.draft_probs.to(torch.float64) for item in items if item.draft_probs is not None and item.draft_tokens
        ]
        q = to_device(torch.cat(given_q), device) if given_q else None
        n = len(items)
        return cls(layout, ua.view(n, max_k), ur.view(n, max_k + 1), sampling, q, qr.view(n, max_k), has_q.bool())


def _sampled_batch(plan: _SampledLayout) -> torch.Tensor:
    """[items, 2] int64: (accepted, recovered or bonus token), as `rejection_sample` draws them."""
    lay = plan.layout
    p = probs_from_logits_rows(lay.stacked(), plan.sampling)  # [rows, vocab]
    px = p[lay.rows[:, : lay.max_k], lay.drafts]  # [items, max_k]
    qx = torch.ones_like(px)  # one-hot q: q(x) = 1
    if plan.q is not None:
        qx = torch.where(plan.has_q[:, None], plan.q[plan.q_rows, lay.drafts], qx)
    ratio = torch.where(qx > 0, torch.minimum(px / qx, torch.ones_like(px)), torch.zeros_like(px))
    accept = (plan.u_accept < ratio) & lay.valid()
    num = accept.long().cumprod(dim=1).sum(dim=1)  # the first rejection, or k_b
    p_sel = p[lay.rows.gather(1, num[:, None])[:, 0]]  # [items, vocab]: the row the token comes from
    bonus = num == lay.num_drafts
    q_sel = torch.zeros_like(p_sel)  # the bonus row's q is unused (drawn from p itself)
    if lay.max_k:
        at = num.clamp(max=lay.max_k - 1)[:, None]
        q_sel.scatter_(1, lay.drafts.gather(1, at), (~plan.has_q & ~bonus)[:, None].to(p.dtype))
        if plan.q is not None:
            q_sel = torch.where((plan.has_q & ~bonus)[:, None], plan.q[plan.q_rows.gather(1, at)[:, 0]], q_sel)
    residual = torch.clamp(p_sel - q_sel, min=0.0)
    total = residual.sum(dim=-1, keepdim=True)
    dist = torch.where(bonus[:, None] | (total <= 0), p_sel, residual / total)
    token = sample_rows(dist, plan.u_resample.gather(1, num[:, None]))
    return torch.stack([num, token[:, 0]], dim=1)


def sample_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`sample_index` on each row of probs [n, vocab] with its uniform u [n, 1] -> [n, 1]
    int64, on the device: the same float64 inverse CDF, the same fallback to the last
    nonzero entry when u * total rounds to the very end."""
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    vocab = probs.shape[-1]
    picked = probs.gather(1, idx.clamp(max=vocab - 1))
    columns = torch.arange(vocab, device=probs.device)
    last = torch.where(probs > 0, columns, -1).amax(dim=-1, keepdim=True)
    return torch.where((idx >= vocab) | (picked <= 0), last, idx)
