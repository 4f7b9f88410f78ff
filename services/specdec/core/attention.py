"""Attention for a flattened batch of sessions over slotted KV caches (`core/kv_cache.py`).

Decode and verify steps feed a few tokens per session. Attending per session costs one
kernel call (plus cache writes and reshapes) per session and layer, which dominated a
batched pass on CPU (8 sessions: 460 us of a layer's attention vs 200 us batched).
Sessions whose slots share a slab are therefore attended together: their new keys and
values are written with one indexed store, and one call attends over a view of the
slab's slot range, queries padded to the longest session's rows and keys masked to each
session's own length. Prefills (many rows) and lone sessions attend by themselves.

A session may feed a token tree (`ForwardItem.parents`): its rows then see the cache and
their own ancestors among the new rows, not every earlier row (SpecInfer's tree mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from specdec.core.kv_cache import SessionKV, Slab

GROUP_MAX_ROWS = 16  # a session feeding more rows than this (a prefill) attends alone


@dataclass
class _Single:
    kv: SessionKV
    rows: slice  # its rows in the flattened batch
    start: int
    mask: torch.Tensor | None  # [1, 1, group*rows, start+rows]; None for one row


@dataclass
class _Group:
    slab: Slab
    first_slot: int
    rows: torch.Tensor  # [n] rows of the flattened batch, session by session
    slots: torch.Tensor  # [n] slot of each row (in the slab)
    positions: torch.Tensor  # [n] absolute position of each row
    slot_offsets: torch.Tensor  # [n] slot - first_slot
    row_offsets: torch.Tensor  # [n] row within its session
    num_slots: int
    max_rows: int
    length: int  # keys attended: the longest session's end
    mask: torch.Tensor  # [num_slots, 1, group*max_rows, length]


class BatchAttention:
    """Plans, once per forward pass, how each session attends; then runs every layer."""

    def __init__(
        self,
        kvs: list[SessionKV],
        starts: list[int],
        sizes: list[int],
        num_heads: int,
        num_kv_heads: int,
        device: torch.device,
        trees: list[list[int] | None] | None = None,
    ) -> None:
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.trees = trees or [None] * len(kvs)
        self.group = num_heads // num_kv_heads
        self.singles: list[_Single] = []
        self.groups: list[_Group] = []
        offsets = [0, *accumulate(sizes)][:-1]
        by_slab: dict[int, list[int]] = {}
        for i, (kv, size) in enumerate(zip(kvs, sizes)):
            if size <= GROUP_MAX_ROWS and kv.slab is not None:
                by_slab.setdefault(id(kv.slab), []).append(i)
            else:
                self._single(kv, offsets[i], starts[i], size, device, self.trees[i])
        for members in by_slab.values():
            slots = [kvs[i].index for i in members]
            if len(members) == 1 or max(slots) - min(slots) + 1 > 2 * len(members):
                for i in members:  # alone, or too many idle slots between them to pad over
                    self._single(kvs[i], offsets[i], starts[i], sizes[i], device, self.trees[i])
            else:
                self.groups.append(
                    self._plan_group(
                        [kvs[i] for i in members],
                        [offsets[i] for i in members],
                        [starts[i] for i in members],
                        [sizes[i] for i in members],
                        device,
                        [self.trees[i] for i in members],
                    )
                )

    def _single(
        self, kv: SessionKV, offset: int, start: int, size: int, device: torch.device, tree: list[int] | None
    ) -> None:
        mask = None
        if size > 1:  # query t (absolute start+t) sees keys 0..start+t
            keys = torch.arange(start + size, device=device)
            queries = torch.arange(start, start + size, device=device)
            visible = keys[None, :] <= queries[:, None]
            if tree is not None:
                visible[:, start:] = ancestors(tree, device)
            mask = visible.repeat(self.group, 1)[None, None]
        self.singles.append(_Single(kv, slice(offset, offset + size), start, mask))

    def _plan_group(
        self,
        kvs: list[SessionKV],
        offsets: list[int],
        starts: list[int],
        sizes: list[int],
        device: torch.device,
        trees: list[list[int] | None],
    ) -> _Group:
        first = min(kv.index for kv in kvs)
        num_slots = max(kv.index for kv in kvs) - first + 1
        max_rows = max(sizes)
        rows, slots, positions, slot_offsets, row_offsets = [], [], [], [], []
        # limit[s][r]: the last key that row r of slot s may see; padding sees key 0 only
        # (a fully masked row would be NaN), and its output is never read.
        limit = [[0] * max_rows for _ in range(num_slots)]
        for kv, offset, start, size in zip(kvs, offsets, starts, sizes):
            for r in range(size):
                rows.append(offset + r)
                slots.append(kv.index)
                positions.append(start + r)
                slot_offsets.append(kv.index - first)
                row_offsets.append(r)
                limit[kv.index - first][r] = start + r
        length = max(s + n for s, n in zip(starts, sizes))
        keys = torch.arange(length, device=device)
        visible = keys <= torch.tensor(limit, device=device)[:, :, None]  # [slots, max_rows, length]
        for kv, start, size, tree in zip(kvs, starts, sizes, trees):
            if tree is not None:
                visible[kv.index - first, :size, start : start + size] = ancestors(tree, device)
        mask = visible[:, None, None].expand(num_slots, 1, self.group, max_rows, length)
        rows_t, slots_t, positions_t, slot_offsets_t, row_offsets_t = (
            torch.tensor(xs, device=device) for xs in (rows, slots, positions, slot_offsets, row_offsets)
        )
        slab = kvs[0].slab
        assert slab is not None  # only sessions holding a slot are grouped
        return _Group(
            slab,
            first,
            rows_t,
            slots_t,
            positions_t,
            slot_offsets_t,
            row_offsets_t,
            num_slots,
            max_rows,
            length,
            mask.reshape(num_slots, 1, self.group * max_rows, length),
        )

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Write this layer's new k, v [n, kv_heads, d] into the caches and attend with q
        [n, heads, d]; returns [n, heads, d]."""
        out = torch.empty_like(q)
        for s in self.singles:
            keys, values = s.kv.write(layer, s.start, k[s.rows].transpose(0, 1), v[s.rows].transpose(0, 1))
            out[s.rows] = self._attend_one(q[s.rows], keys, values, s.mask, scale)
        for g in self.groups:
            out[g.rows] = self._attend_group(g, layer, q[g.rows], k[g.rows], v[g.rows], scale)
        return out

    def _attend_one(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """q [t, heads, d] against one session's cache views [kv_heads, len, d].

        Grouped-query heads are folded into the query rows ([kv_heads, group*t, d]) so the
        cache is read in place instead of being expanded per query head."""
        t = q.shape[0]
        q = q.transpose(0, 1).reshape(self.num_kv_heads, self.group * t, q.shape[-1])
        # 4-D inputs let CPU torch pick its flash kernel (3-D ones take the slower math
        # path: 45 vs 29 us per call on SmolLM2's shapes).
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, scale=scale)
        return out[0].reshape(self.num_heads, t, -1).transpose(0, 1)

    def _attend_group(
        self, g: _Group, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        cache_k, cache_v = g.slab.keys[layer], g.slab.values[layer]
        cache_k[g.slots, :, g.positions] = k
        cache_v[g.slots, :, g.positions] = v
        d = q.shape[-1]
        padded = q.new_zeros(g.num_slots, self.num_kv_heads, self.group, g.max_rows, d)
        padded[g.slot_offsets, :, :, g.row_offsets] = q.view(-1, self.num_kv_heads, self.group, d)
        span = slice(g.first_slot, g.first_slot + g.num_slots)
        out = F.scaled_dot_product_attention(
            padded.view(g.num_slots, self.num_kv_heads, self.group * g.max_rows, d),
            cache_k[span, :, : g.length],
            cache_v[span, :, : g.length],
            attn_mask=g.mask,
            scale=scale,
        )
        out = out.view(g.num_slots, self.num_kv_heads, self.group, g.max_rows, d)
        return out[g.slot_offsets, :, :, g.row_offsets].reshape(-1, self.num_heads, d)


def ancestors(parents: list[int], device: torch.device) -> torch.Tensor:
    """[n, n] bool: row i is True at i and at each ancestor of node i (parents[i] < i, -1
    for a root), the keys a tree's row may see among the tree's own rows."""
    n = len(parents)
    rows: list[list[bool]] = []
    for i, parent in enumerate(parents):
        assert parent < i, "a node's parent comes before it"
        row = list(rows[parent]) if parent >= 0 else [False] * n
        row[i] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool, device=device)
