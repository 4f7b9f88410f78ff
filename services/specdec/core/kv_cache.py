"""KV caches in shared slots, rolled back instead of rebuilt.

A `KVPool` (one per runner) keeps every session's KV in slabs: a slab holds a few slots of
one capacity class (64, 128, 256, ... positions) as one tensor per layer for keys and one
for values, [slots, kv_heads, capacity, head_dim]. Each session's `SessionKV` owns one
slot. Appending writes in place; rejection truncates the length (O(1)); outgrowing a slot
moves the session to a slot of the next class (one copy of its valid prefix, amortised
O(1) per token, like doubling). A full class gets a new slab; nothing already stored is
ever copied to make room.

Because the sessions of a slab sit side by side in one tensor, a batched forward attends
for all of them in one call over a view of it, instead of one call per session; nobody's
context is copied or concatenated (see `core/attention.py`).
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from transformers import DynamicCache

MIN_CAPACITY = 64
SLAB_BYTES = 128 << 20  # slots per slab: as many as fit (at most MAX_SLAB_SLOTS), at least one
MAX_SLAB_SLOTS = 16


def capacity_class(total: int) -> int:
    """The smallest slot capacity (a power of two, at least MIN_CAPACITY) holding `total`."""
    capacity = MIN_CAPACITY
    while capacity < total:
        capacity *= 2
    return capacity


class Slab:
    """Slots of one capacity: per layer, keys and values [slots, kv_heads, capacity, head_dim]."""

    # Normal tensors even when created inside a forward pass (inference mode): the KV
    # store restores into them from outside one.
    @torch.inference_mode(False)
    def __init__(self, pool: KVPool, capacity: int, slots: int, number: int) -> None:
        self.capacity, self.number, self.used = capacity, number, 0
        shape = (slots, pool.num_kv_heads, capacity, pool.head_dim)
        # Zeros, not empty: a batched attention reads (masked) positions past a session's
        # length, and a masked NaN would still poison P @ V.
        self.keys = [torch.zeros(shape, dtype=pool.dtype, device=pool.device) for _ in range(pool.num_layers)]
        self.values = [torch.zeros(shape, dtype=pool.dtype, device=pool.device) for _ in range(pool.num_layers)]

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0


class SlotClass:
    """All slabs of one capacity. Slots are handed out lowest first, so live sessions stay
    packed in the first slabs and a batch spans few of them. A slab whose last session
    leaves is dropped (memory comes back after a load peak), except one kept spare so a
    lone request does not allocate and zero a slab every time."""

    def __init__(self, pool: KVPool, capacity: int) -> None:
        self.pool, self.capacity = pool, capacity
        slot_bytes = 2 * pool.num_layers * pool.num_kv_heads * capacity * pool.head_dim * pool.dtype.itemsize
        self.slab_slots = max(1, min(MAX_SLAB_SLOTS, SLAB_BYTES // max(1, slot_bytes)))
        self.slabs: dict[int, Slab] = {}
        self._free: list[int] = []  # a heap of free slot numbers over all slabs

    def acquire(self) -> tuple[Slab, int]:
        if not self._free:
            number = next(n for n in range(len(self.slabs) + 1) if n not in self.slabs)
            self.slabs[number] = Slab(self.pool, self.capacity, self.slab_slots, number)
            for index in range(self.slab_slots):
                heapq.heappush(self._free, number * self.slab_slots + index)
        slot = heapq.heappop(self._free)
        slab = self.slabs[slot // self.slab_slots]
        slab.used += 1
        return slab, slot % self.slab_slots

    def release(self, slab: Slab, index: int) -> None:
        slab.used -= 1
        heapq.heappush(self._free, slab.number * self.slab_slots + index)
        empty = [s for s in self.slabs.values() if s.used == 0]
        if len(empty) > 1:  # keep one spare: the lowest, where the next session goes
            drop = max(empty, key=lambda s: s.number)
            del self.slabs[drop.number]
            first = drop.number * self.slab_slots
            self._free = [n for n in self._free if not first <= n < first + self.slab_slots]
            heapq.heapify(self._free)


class KVPool:
    """Every session's KV for one model, in slabs by capacity class."""

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.classes: dict[int, SlotClass] = {}
        # Slots are freed when a SessionKV is garbage collected, which may happen on any
        # thread, and also on this one in the middle of acquire(): allocating a slab can
        # run the collector while the lock is held. So a release never waits for the lock:
        # it queues the slot, and whoever holds the lock takes queued slots back.
        self._lock = threading.Lock()
        self._returned: deque[tuple[Slab, int]] = deque()  # append/popleft are atomic

    def acquire(self, total: int) -> tuple[Slab, int]:
        capacity = capacity_class(total)
        with self._lock:
            self._take_back()
            slots = self.classes.get(capacity)
            if slots is None:
                slots = self.classes[capacity] = SlotClass(self, capacity)
            return slots.acquire()

    def release(self, slab: Slab, index: int) -> None:
        """Give a slot back. Never blocks (see __init__): if another caller holds the lock,
        the slot is taken back by that caller's next acquire or release."""
        self._returned.append((slab, index))
        if self._lock.acquire(blocking=False):
            try:
                self._take_back()
            finally:
                self._lock.release()

    def _take_back(self) -> None:
        while self._returned:
            slab, index = self._returned.popleft()
            self.classes[slab.capacity].release(slab, index)


class SessionKV:
    """The cached keys/values of one sequence (one slot of a `KVPool`), and the token ids
    they were computed from. Without a pool it holds tokens only (runners that keep their
    own cache, like HFRunner)."""

    def __init__(self, pool: KVPool | None) -> None:
        self.pool = pool
        self.slab: Slab | None = None
        self.index = -1  # the slot within the slab
        self._finalizer: weakref.finalize[[Slab, int], SessionKV] | None = None
        self.token_ids: list[int] = []  # tokens whose KV is cached, in order
        self.hf_cache: DynamicCache | None = None  # the model's own cache, for runners without a pool (HFRunner)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def capacity(self) -> int:
        return self.slab.capacity if self.slab is not None else 0

    @property
    def has_buffers(self) -> bool:
        """Whether the KV lives here (and can be stored or restored), not in a model's own cache."""
        return self.pool is not None and self.pool.num_layers > 0

    def reserve(self, total: int) -> None:
        """Make room for `total` positions: move to a slot of a larger class if needed,
        copying only the valid prefix."""
        if total <= self.capacity:
            return
        assert self.pool is not None, "this cache has no buffers"
        slab, index = self.pool.acquire(total)
        old, old_index, n = self.slab, self.index, self.length
        if old is not None:
            for new_buf, old_buf in zip((*slab.keys, *slab.values), (*old.keys, *old.values)):
                new_buf[index, :, :n] = old_buf[old_index, :, :n]
            assert self._finalizer is not None  # set with the slot
            self._finalizer.detach()
            self.pool.release(old, old_index)
        self.slab, self.index = slab, index
        self._finalizer = weakref.finalize(self, self.pool.release, slab, index)

    def copy_prefix(self, source: SessionKV, n: int) -> None:
        """Hold the first `n` positions of `source` (a cache of the same pool) instead of
        what this one held: its keys, values and token ids, one copy per layer. Sessions
        that share a prompt (n > 1 choices) fork its rows this way instead of computing them."""
        assert source is not self and source.pool is self.pool and self.has_buffers, "a cache of the same pool"
        assert 0 <= n <= source.length, (n, source.length)
        if n == 0:
            self.truncate(0)
            return
        assert source.slab is not None
        self.truncate(0)  # nothing of the old content is moved if the slot must grow
        self.reserve(n)
        assert self.slab is not None
        with torch.no_grad():
            for dst, src in zip((*self.slab.keys, *self.slab.values), (*source.slab.keys, *source.slab.values)):
                dst[self.index, :, :n] = src[source.index, :, :n]
        self.token_ids[:] = source.token_ids[:n]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [kv_heads, t, head_dim] at positions start..start+t; return views of
        positions 0..start+t."""
        end = start + k.shape[1]
        keys, values = self.read(layer, 0, end)
        keys[:, start:end] = k
        values[:, start:end] = v
        return keys, values

    def read(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the keys and values [kv_heads, end-start, head_dim] at positions start..end."""
        assert self.slab is not None and end <= self.capacity
        return (self.slab.keys[layer][self.index, :, start:end], self.slab.values[layer][self.index, :, start:end])

    def commit(self, token_ids: list[int]) -> None:
        """Record that KV for `token_ids` was written after the current length."""
        self.token_ids.extend(token_ids)

    def truncate(self, length: int) -> None:
        """Roll back to the first `length` tokens."""
        assert 0 <= length <= self.length, (length, self.length)
        del self.token_ids[length:]

    def keep_path(self, base: int, nodes: list[int]) -> None:
        """Keep, after the first `base` positions, only the rows `base + n` for n in `nodes`
        (ascending: a tree's accepted path, each node after its parent), moved down to
        `base`, `base + 1`, ...; drop the rest. A verified token tree wrote every node's
        row; only the path the target agreed with stays. Keys were rotated at their depth
        before they were stored, so a moved row is already right at its new place."""
        assert all(b > a for a, b in itertools.pairwise(nodes)), "path nodes must ascend"
        assert not nodes or base + nodes[-1] < self.length
        moved = [i for i, n in enumerate(nodes) if n != i]
        if moved and self.has_buffers:
            assert self.slab is not None
            src = torch.tensor([base + nodes[i] for i in moved], device=self.slab.keys[0].device)
            dst = torch.tensor([base + i for i in moved], device=src.device)
            for buf in (*self.slab.keys, *self.slab.values):
                row = buf[self.index]  # [kv_heads, capacity, head_dim]
                row[:, dst] = row[:, src]  # the gather copies first: sources never see a moved row
        kept = [self.token_ids[base + n] for n in nodes]
        del self.token_ids[base:]
        self.token_ids.extend(kept)

    def common_prefix(self, tokens: list[int]) -> int:
        """Length of the longest common prefix of the cached tokens and `tokens`."""
        n = min(self.length, len(tokens))
        cached = self.token_ids
        i = 0
        # Fast path: the usual case is that the cache is a prefix of `tokens`.
        if cached[:n] == tokens[:n]:
            return n
        while i < n and cached[i] == tokens[i]:
            i += 1
        return i


T = TypeVar("T")


class SessionTable(Generic[T]):
    """session id -> per-session state, least recently used first, bounded in count.

    Evicting a session only costs a recomputation: callers resend tokens when the replica
    answers that it lacks them (needs_resync).
    """

    def __init__(self, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.max_sessions = max_sessions
        self._items: OrderedDict[str, T] = OrderedDict()
        self._used: dict[str, float] = {}  # monotonic time of each session's last use

    def get(self, session_id: str) -> T | None:
        item = self._items.get(session_id)
        if item is not None:
            self._items.move_to_end(session_id)
            self._used[session_id] = time.monotonic()
        return item

    def put(self, session_id: str, item: T) -> None:
        self._items[session_id] = item
        self._items.move_to_end(session_id)
        self._used[session_id] = time.monotonic()
        while len(self._items) > self.max_sessions:
            evicted, _ = self._items.popitem(last=False)
            self._used.pop(evicted, None)

    def pop(self, session_id: str) -> T | None:
        self._used.pop(session_id, None)
        return self._items.pop(session_id, None)

    def drop_idle(self, max_idle_s: float) -> int:
        """Forget sessions unused for `max_idle_s`: their caller is gone (a coordinator that
        died, a release that never arrived). Least recently used first, so this stops at the
        first session in use. Returns how many were dropped."""
        horizon, dropped = time.monotonic() - max_idle_s, 0
        while self._items:
            oldest = next(iter(self._items))
            if self._used.get(oldest, 0.0) > horizon:
                break
            self.pop(oldest)
            dropped += 1
        return dropped

    def least_recent_first(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def __len__(self) -> int:
        return len(self._items)


class HasTokens(Protocol):
    tokens: list[int]


S = TypeVar("S", bound=HasTokens)


def trim_to_tokens(table: SessionTable[S], max_tokens: int, keep: Container[str]) -> int:
    """Evict least recently used sessions, never those in `keep` (the batch being run),
    until all sessions together hold at most `max_tokens` tokens: the replica's memory
    budget for caches, which grow with their tokens. Returns how many were evicted (each
    costs only a recomputation, should its request come back)."""
    sessions = table.least_recent_first()  # one copy per batch: evicting changes the table
    total = sum(len(session.tokens) for _, session in sessions)
    evicted = 0
    for session_id, session in sessions:
        if total <= max_tokens:
            break
        if session_id not in keep:
            table.pop(session_id)
            total -= len(session.tokens)
            evicted += 1
    return evicted


def sync_session(
    table: SessionTable[S], session_id: str, prefix_len: int, tokens: list[int], create: Callable[[], S]
) -> S | None:
    """Apply a delta (`prefix_len` known tokens, then `tokens`) to a session's committed
    tokens; None when this replica lacks the prefix and the caller must resend from 0."""
    session = table.get(session_id)
    if session is None:
        if prefix_len:
            return None
        session = create()
        table.put(session_id, session)
    if prefix_len > len(session.tokens):
        return None
    del session.tokens[prefix_len:]
    session.tokens.extend(tokens)
    return session


def kv_token_budget(budget_mb: float, pool: KVPool | None, device: str | torch.device = "cpu") -> int | None:
    """How many tokens of cache a replica may hold: `budget_mb` of it, or with 0 a share of
    this machine's memory measured now (30% of RAM on a CPU, half of the free memory on a
    GPU, after the model is loaded). None for runners that keep their own cache. Slots
    round a cache up to a power of two, so the bytes held stay under twice the budget."""
    if pool is None or pool.num_layers == 0:
        return None
    per_token = 2 * pool.num_layers * pool.num_kv_heads * pool.head_dim * pool.dtype.itemsize
    if budget_mb > 0:
        budget = int(budget_mb * (1 << 20))
    elif torch.device(device).type == "cuda":
        budget = torch.cuda.mem_get_info(torch.device(device))[0] // 2
    else:
        budget = int(0.3 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return max(1, budget // per_token)
