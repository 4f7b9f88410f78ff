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

import itertools
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
    # A token tree (one-hot drafts): each draft's parent among the drafts, -1 for the root
    # (the last committed token); logits row 1 + i scores what follows draft i. None: a chain.
    parents: list[int] | None = None


@dataclass
class RejectionOutput:
    num_accepted: int  # leading draft tokens kept
    tokens: list[int]  # accepted drafts + one recovered or bonus token
    path: list[int] | None = None  # a tree's accepted drafts (their indices); None for a chain

    def rows(self) -> list[int]:
        """The logits row that predicted each of `tokens`."""
        if self.path is None:
            return list(range(len(self.tokens)))
        return [0, *(1 + node for node in self.path)]


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, token: int) -> float:
    """min(1, p(x)/q(x)); a draft the drafter could not have drawn (q(x)=0) is rejected."""
    qx = float(q[token])
    return 0.0 if qx <= 0 else min(1.0, float(p[token]) / qx)


def recovery_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)); equals p when p == q (then rejection has probability 0)."""
    residual = torch.clamp(p - q, min=0.0)
    total = residual.sum()
    return p if total <= 0 else residual / total


def one_hot(token: int, vocab: int, device: torch.device | None = None) -> torch.Tensor:
    q = torch.zeros(vocab, dtype=torch.float64, device=device)
    q[token] = 1.0
    return q


def rejection_sample(item: RejectionInput) -> RejectionOutput:
    """Verify one sequence's draft."""
    k = len(item.draft_tokens)
    assert item.target_logits.shape[0] == k + 1, "need logits for k drafts plus one"
    if item.parents is not None:
        assert item.draft_probs is None, "token trees carry one-hot drafts"
        if item.sampling.greedy:
            return greedy_tree(item.target_logits.argmax(dim=-1).tolist(), item.draft_tokens, item.parents)
        return _sampled_tree(item)
    if item.sampling.greedy:
        return _greedy(item.target_logits, item.draft_tokens)
    p = probs_from_logits(item.target_logits, item.sampling)
    seed, pos0 = item.sampling.seed, item.first_position
    vocab = p.shape[-1]
    for i, x in enumerate(item.draft_tokens):
        q = item.draft_probs[i] if item.draft_probs is not None else one_hot(x, vocab, p.device)
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


def greedy_tree(argmax: list[int], draft: list[int], parents: list[int]) -> RejectionOutput:
    """Walk the tree from the root while some child is the target's argmax after its
    parent (`argmax[0]` after the root, `argmax[1 + i]` after draft i): the longest path
    the target agrees with, then the target's own token. Greedy decoding exactly."""
    children = _children(parents)
    path: list[int] = []
    node = -1
    while True:
        want = argmax[1 + node]
        node = next((c for c in children.get(node, ()) if draft[c] == want), -2)
        if node == -2:
            return RejectionOutput(len(path), [*(draft[n] for n in path), want], path)
        path.append(node)


def _children(parents: list[int]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    return children


def walk_sampled_tree(
    at: list[float], draft: list[int], parents: list[int], seed: int, first_position: int
) -> tuple[list[int], int, list[int]]:
    """SpecInfer's multi-step speculative sampling (arXiv 2305.09781) for one-hot drafts.
    From the root, each child x of the node in turn is kept with probability r(x), r being
    the node's target distribution p with the siblings rejected before it zeroed and the
    rest renormalised (max(0, r - onehot) normalised: the chain rule for a one-hot q);
    a kept child becomes the node. `at[c]` is p(draft[c]) at c's parent. Returns the kept
    path, its last node (-1: the root) and the tokens rejected there; the step's own token
    is then drawn from that node's p without them. Output ~ p exactly, as for a chain; a
    chain (one child each) draws the same uniforms as the chain judge."""
    children = _children(parents)
    path: list[int] = []
    node = -1
    while True:
        position = first_position + len(path)
        rejected: list[int] = []
        removed = 0.0  # p-mass of the rejected siblings
        for j, child in enumerate(children.get(node, ())):
            x = draft[child]
            if x in rejected:
                continue  # zeroed already: it cannot be kept
            ratio = at[child] / (1.0 - removed) if removed < 1.0 else 0.0
            if uniform(seed, position, Purpose.ACCEPT, j) < ratio:
                path.append(child)
                node = child
                break
            rejected.append(x)
            removed += at[child]
        else:
            return path, node, rejected


def _sampled_tree(item: RejectionInput) -> RejectionOutput:
    assert item.parents is not None
    p = probs_from_logits(item.target_logits, item.sampling)
    at = p[[1 + parent for parent in item.parents], item.draft_tokens].tolist() if item.parents else []
    path, node, rejected = walk_sampled_tree(
        at, item.draft_tokens, item.parents, item.sampling.seed, item.first_position
    )
    row = p[1 + node].clone()
    row[rejected] = 0.0
    if not float(row.sum()) > 0:  # rounding left no mass: the row itself
        row = p[1 + node]
    token = sample_index(row, uniform(item.sampling.seed, item.first_position + len(path), Purpose.RESAMPLE))
    return RejectionOutput(len(path), [*(item.draft_tokens[n] for n in path), token], path)


def rejection_sample_batch(items: list[RejectionInput], by_item: bool | None = None) -> list[RejectionOutput]:
    """Verify many sequences' drafts at once: `rejection_sample` on each, but with one
    device->host read for the whole batch, and one more when sampled token trees draw their
    own tokens after their walk (and a few host->device copies, all made before
    the first kernel so none waits on our own work). `by_item`: run the row-wise work item
    by item (default: on a CPU) or on all rows stacked (default elsewhere); tests take both."""
    if not items:
        return []
    trees = [b for b, item in enumerate(items) if item.parents is not None and item.sampling.greedy]
    sampled_trees = [b for b, item in enumerate(items) if item.parents is not None and not item.sampling.greedy]
    greedy = [b for b, item in enumerate(items) if item.sampling.greedy and item.parents is None]
    sampled = [b for b, item in enumerate(items) if not item.sampling.greedy and item.parents is None]
    if by_item is None:
        by_item = items[0].target_logits.device.type == "cpu"
    greedy_plan = _Layout.build([items[b] for b in greedy], by_item) if greedy else None
    sampled_plan = _SampledLayout.build([items[b] for b in sampled], by_item) if sampled else None
    parts = []
    if greedy_plan is not None:
        parts.append(_greedy_batch(greedy_plan))
    if sampled_plan is not None:
        parts.append(_sampled_batch(sampled_plan))
    parts = [part.flatten() for part in parts]
    parts += [items[b].target_logits.argmax(dim=-1) for b in trees]  # every tree row's argmax
    tree_probs = _TreeProbs.build([items[b] for b in sampled_trees]) if sampled_trees else None
    if tree_probs is not None:  # p at every sampled tree node, in float64 (ids < 2**53 stay exact)
        parts = [part.to(torch.float64) for part in parts] + [tree_probs.at]
    flat = to_host(torch.cat(parts)).tolist()  # the one read of the batch (a second: sampled trees' own tokens)
    chains = len(greedy) + len(sampled)
    outputs: list[RejectionOutput | None] = [None] * len(items)
    for b, num_accepted, token in zip(greedy + sampled, flat[0 : 2 * chains : 2], flat[1 : 2 * chains : 2]):
        num_accepted, token = int(num_accepted), int(token)  # floats when sampled trees shared the read
        outputs[b] = RejectionOutput(num_accepted, [*items[b].draft_tokens[:num_accepted], token])
    at = 2 * chains
    for b in trees:
        item = items[b]
        rows = len(item.draft_tokens) + 1
        assert item.parents is not None
        outputs[b] = greedy_tree([int(x) for x in flat[at : at + rows]], item.draft_tokens, item.parents)
        at += rows
    if tree_probs is not None:
        for b, out in zip(sampled_trees, tree_probs.judge(flat[at:])):
            outputs[b] = out
    return [out for out in outputs if out is not None]


@dataclass
class _TreeProbs:
    """Sampled token trees on the device: each item's processed target p, and p at every
    node (its parent's row, its token) to read back with the batch's verdicts."""

    items: list[RejectionInput]
    probs: list[torch.Tensor]  # [nodes + 1, vocab] per item
    at: torch.Tensor  # [all nodes] float64

    @classmethod
    def build(cls, items: list[RejectionInput]) -> _TreeProbs:
        device = items[0].target_logits.device
        probs = [probs_from_logits(item.target_logits, item.sampling) for item in items]
        rows = [[1 + parent for parent in item.parents or []] for item in items]
        index = to_device_split([*rows, *(item.draft_tokens for item in items)], torch.int64, device)
        n = len(items)
        at = [p[index[b], index[n + b]].to(torch.float64) for b, p in enumerate(probs)]
        return cls(items, probs, torch.cat(at))

    def judge(self, at: list[float]) -> list[RejectionOutput]:
        """Walk each tree on the host with the p read back; draw every item's own token on
        the device from its last node's p without the rejected tokens: one more read."""
        walks, offset = [], 0
        for item in self.items:
            assert item.parents is not None
            n = len(item.parents)
            seed, pos0 = item.sampling.seed, item.first_position
            walks.append(walk_sampled_tree(at[offset : offset + n], item.draft_tokens, item.parents, seed, pos0))
            offset += n
        dist = torch.stack([p[1 + node] for p, (_, node, _) in zip(self.probs, walks)])
        device = dist.device
        zeroed = [(b, x) for b, (_, _, rejected) in enumerate(walks) for x in rejected]
        u = [
            uniform(item.sampling.seed, item.first_position + len(path), Purpose.RESAMPLE)
            for item, (path, _, _) in zip(self.items, walks)
        ]
        rows_t, cols_t = to_device_split([[b for b, _ in zeroed], [x for _, x in zeroed]], torch.int64, device)
        (u_t,) = to_device_split([u], torch.float64, device)
        kept = dist.index_put((rows_t, cols_t), torch.zeros(len(zeroed), dtype=dist.dtype, device=device))
        kept = torch.where(kept.sum(dim=-1, keepdim=True) > 0, kept, dist)  # rounding left no mass: the row itself
        tokens = to_host(sample_rows(kept, u_t[:, None])[:, 0]).tolist()
        return [
            RejectionOutput(len(path), [*(item.draft_tokens[n] for n in path), token], path)
            for item, (path, _, _), token in zip(self.items, walks, tokens)
        ]


@dataclass
class _Layout:
    """A batch's draft positions on the device, padded to the longest draft."""

    logits: list[torch.Tensor]  # [k_b + 1, vocab] per item
    rows: torch.Tensor  # [items, max_k + 1] int64: stacked row of position i (past k_b: the item's last)
    drafts: torch.Tensor  # [items, max_k] int64: draft tokens, 0 past k_b
    num_drafts: torch.Tensor  # [items] int64: k_b
    ks: list[int]  # [items] k_b, on the host
    max_k: int
    # Row-wise work item by item rather than on all rows stacked. On a CPU, yes: an item's
    # rows stay in cache through every step, where all rows at once stream through memory
    # step after step, and there is no launch to save. On an accelerator, stacked:
    # launches, not bytes, cost there.
    by_item: bool

    @classmethod
    def build(cls, items: list[RejectionInput], by_item: bool) -> _Layout:
        ks = [len(item.draft_tokens) for item in items]
        max_k = max(ks)
        rows: list[int] = []
        drafts: list[int] = []
        starts = 0
        for item, k in zip(items, ks):
            assert item.target_logits.shape[0] == k + 1, "need logits for k drafts plus one"
            rows += [starts + min(i, k) for i in range(max_k + 1)]
            drafts += item.draft_tokens + [0] * (max_k - k)
            starts += k + 1
        device = items[0].target_logits.device
        flat_rows, flat_drafts, num = to_device_split([rows, drafts, ks], torch.int64, device)
        n = len(items)
        logits = [item.target_logits for item in items]
        return cls(logits, flat_rows.view(n, -1), flat_drafts.view(n, -1), num, ks, max_k, by_item)

    def blocks(self) -> list[tuple[int, int, torch.Tensor]]:
        """(first row, end row, logits) of each block the row-wise work runs on."""
        if not self.by_item:
            stacked = self.stacked()
            return [(0, stacked.shape[0], stacked)]
        ends = list(itertools.accumulate(k + 1 for k in self.ks))
        return [(end - k - 1, end, logits) for end, k, logits in zip(ends, self.ks, self.logits)]

    def stacked(self) -> torch.Tensor:
        """[rows, vocab]: every item's rows in one tensor (float64 if the dtypes differ: exact)."""
        dtypes = {logits.dtype for logits in self.logits}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
        return torch.cat([logits.to(dtype) for logits in self.logits])

    def valid(self) -> torch.Tensor:
        """[items, max_k] bool: the draft positions that exist."""
        return torch.arange(self.max_k, device=self.num_drafts.device)[None, :] < self.num_drafts[:, None]


def _greedy_batch(plan: _Layout) -> torch.Tensor:
    """[items, 2] int64: (accepted, argmax after them); accept while the draft is the argmax."""
    argmax = torch.cat([logits.argmax(dim=-1) for _, _, logits in plan.blocks()])[plan.rows]  # [items, max_k + 1]
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
    sampling: RowSampling  # per stacked logits row
    row_drafts: torch.Tensor  # [rows] int64: the draft token each row judges (0 on a bonus row)
    q: list[torch.Tensor | None]  # [k_b, vocab] float64 per item: its draft_probs; None for one-hot (or k_b = 0)
    has_q: torch.Tensor  # [items] bool

    @classmethod
    def build(cls, items: list[RejectionInput], by_item: bool) -> _SampledLayout:
        device = items[0].target_logits.device
        layout = _Layout.build(items, by_item)
        max_k, vocab = layout.max_k, items[0].target_logits.shape[-1]
        u_accept, u_resample = [], []
        for item in items:
            seed, pos0, k = item.sampling.seed, item.first_position, len(item.draft_tokens)
            u_accept += [uniform(seed, pos0 + i, Purpose.ACCEPT) if i < k else 2.0 for i in range(max_k)]
            u_resample += [uniform(seed, pos0 + i, Purpose.RESAMPLE) if i <= k else 0.0 for i in range(max_k + 1)]
        ua, ur = to_device_split([u_accept, u_resample], torch.float64, device)
        row_params = [item.sampling for item in items for _ in range(len(item.draft_tokens) + 1)]
        sampling = RowSampling.build(row_params, vocab, device)
        q = [
            to_device(item.draft_probs.to(torch.float64), device) if item.draft_probs is not None and k else None
            for item, k in zip(items, layout.ks)
        ]
        row_drafts, has_q = to_device_split(
            [[t for item in items for t in [*item.draft_tokens, 0]], [int(qb is not None) for qb in q]],
            torch.int64,
            device,
        )
        n = len(items)
        return cls(layout, ua.view(n, max_k), ur.view(n, max_k + 1), sampling, row_drafts, q, has_q.bool())


def _sampled_batch(plan: _SampledLayout) -> torch.Tensor:
    """[items, 2] int64: (accepted, recovered or bonus token), as `rejection_sample` draws them.
    Items are independent, so each block (one item, or all stacked) is judged through."""
    lay = plan.layout
    parts = [slice(b, b + 1) for b in range(len(lay.ks))] if lay.by_item else [slice(None)]
    return torch.cat([_judge_block(plan, part, start, end, lg) for part, (start, end, lg) in zip(parts, lay.blocks())])


def _judge_block(plan: _SampledLayout, part: slice, start: int, end: int, logits: torch.Tensor) -> torch.Tensor:
    """[items in part, 2]: the items whose rows are [start, end) of the stack."""
    lay = plan.layout
    p = probs_from_logits_rows(logits, plan.sampling.rows(start, end))  # [end - start, vocab]
    rows = lay.rows[part] - start  # [items in part, max_k + 1], within the block
    px = p.gather(1, plan.row_drafts[start:end, None])[:, 0][rows[:, : lay.max_k]]  # p_i(x_i)
    qx = _q_at_drafts(plan, part)
    ratio = torch.where(qx > 0, torch.minimum(px / qx, torch.ones_like(px)), torch.zeros_like(px))
    accept = (plan.u_accept[part] < ratio) & lay.valid()[part]
    num = accept.long().cumprod(dim=1).sum(dim=1)  # the first rejection, or k_b
    token = _draw(plan, p[rows.gather(1, num[:, None])[:, 0]], num, part)
    return torch.stack([num, token[:, 0]], dim=1)


def _draw(plan: _SampledLayout, p_sel: torch.Tensor, num: torch.Tensor, part: slice) -> torch.Tensor:
    """[items in part, 1]: the recovered token from norm(max(0, p - q)) at the first
    rejection, or the bonus token from p; p_sel [items in part, vocab] is p at that row."""
    bonus = num == plan.layout.num_drafts[part]
    residual = _residual(plan, p_sel, num, part)
    total = residual.sum(dim=-1, keepdim=True)
    dist = torch.where(bonus[:, None] | (total <= 0), p_sel, residual / total)
    return sample_rows(dist, plan.u_resample[part].gather(1, num[:, None]))


def _residual(plan: _SampledLayout, p_sel: torch.Tensor, num: torch.Tensor, part: slice) -> torch.Tensor:
    """max(0, p - q) at each item's rejected position (unused on a bonus row). A one-hot q
    changes one entry: p - 0 is p bit for bit, so only p(x) - 1 is computed."""
    lay = plan.layout
    if not lay.max_k:
        return p_sel
    qs = plan.q[part]
    if all(q is None for q in qs):
        return _one_hot_residual(plan, p_sel, num, part)
    own = torch.minimum(num, lay.num_drafts[part] - 1).clamp(min=0)  # the item's row (k_b - 1 at most)
    q_sel = torch.cat([p_sel[b : b + 1] if q is None else q.index_select(0, own[b : b + 1]) for b, q in enumerate(qs)])
    given = torch.clamp(p_sel - q_sel, min=0.0)
    if all(q is not None for q in qs):
        return given
    return torch.where(plan.has_q[part][:, None], given, _one_hot_residual(plan, p_sel, num, part))


def _one_hot_residual(plan: _SampledLayout, p_sel: torch.Tensor, num: torch.Tensor, part: slice) -> torch.Tensor:
    """max(0, p - onehot(x)) with x the draft token at the rejection."""
    x = plan.layout.drafts[part].gather(1, num.clamp(max=plan.layout.max_k - 1)[:, None])
    return p_sel.scatter(1, x, torch.clamp(p_sel.gather(1, x) - 1.0, min=0.0))


def _q_at_drafts(plan: _SampledLayout, part: slice) -> torch.Tensor:
    """[items in part, max_k] float64: q_i(x_i); 1 for a one-hot draft (and past k_b)."""
    lay = plan.layout
    qs, ks, drafts = plan.q[part], lay.ks[part], lay.drafts[part]
    ones = torch.ones(lay.max_k, dtype=torch.float64, device=drafts.device)
    if all(q is None for q in qs):
        return ones.expand(len(qs), lay.max_k)
    rows = [
        ones if q is None else torch.cat([q.gather(1, drafts[b, :k, None])[:, 0], ones[k:]])
        for b, (q, k) in enumerate(zip(qs, ks))
    ]
    return torch.stack(rows)


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
