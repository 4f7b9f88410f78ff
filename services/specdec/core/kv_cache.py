"""KV caches in shared slots, rolled back instead of rebuilt.

A `KVPool` (one per runner) keeps, per capacity class (64, 128, 256, ... positions), one
tensor per layer of shape [slots, kv_heads, capacity, head_dim] for keys and one for
values. Each session's `SessionKV` owns one slot. Appending writes in place; rejection
truncates the length (O(1)); outgrowing a slot moves the session to a slot of the next
class (one copy of its valid prefix, amortised O(1) per token, like doubling).

Because sessions of one class sit side by side in one tensor, a batched forward can
attend for all of them in one call over a view of that tensor, instead of one call per
session; nobody's context is copied or concatenated (see `core/attention.py`).
"""
from __future__ import annotations

import heapq
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch

MIN_CAPACITY = 64


def capacity_class(total: int) -> int:
    """The smallest slot capacity (a power of two, at least MIN_CAPACITY) holding `total`."""
    capacity = MIN_CAPACITY
    while capacity < total:
        capacity *= 2
    return capacity


class SlotBucket:
    """All slots of one capacity: per layer, keys and values [slots, kv_heads, capacity, head_dim].

    Slot numbers are handed out lowest first, so live sessions stay packed at the front and
    a batch's slots span a short range. The tensors grow by doubling the slot count and
    are dropped when the last slot is freed (memory comes back after a load peak)."""

    def __init__(self, pool: KVPool, capacity: int) -> None:
        self.pool, self.capacity = pool, capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._free: list[int] = []  # a heap
        self.used = 0

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def acquire(self) -> int:
        if not self._free:
            self._grow()
        self.used += 1
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
        self.used -= 1
        if self.used == 0:
            self.keys, self.values, self._free = [], [], []

    # Normal tensors even when growth happens inside a forward pass (inference mode): the
    # KV store restores into them from outside one.
    @torch.inference_mode(False)
    def _grow(self) -> None:
        old = self.slots
        new = max(4, 2 * old)
        p = self.pool
        shape = (new, p.num_kv_heads, self.capacity, p.head_dim)
        for buffers in (self.keys, self.values):
            for i in range(p.num_layers):
                # Zeros, not empty: a batched attention reads (masked) positions past a
                # session's length, and a masked NaN would still poison P @ V.
                tensor = torch.zeros(shape, dtype=p.dtype, device=p.device)
                if old:
                    tensor[:old] = buffers[i]
                    buffers[i] = tensor
                else:
                    buffers.append(tensor)
        for slot in range(old, new):
            heapq.heappush(self._free, slot)


class KVPool:
    """Every session's KV for one model, in slot buckets by capacity class."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.buckets: dict[int, SlotBucket] = {}
        # Slots are freed when a SessionKV is garbage collected, which may happen on any
        # thread; handing out and taking back slots is serialised here.
        self._lock = threading.Lock()

    def acquire(self, total: int) -> tuple[SlotBucket, int]:
        capacity = capacity_class(total)
        with self._lock:
            bucket = self.buckets.get(capacity)
            if bucket is None:
                bucket = self.buckets[capacity] = SlotBucket(self, capacity)
            return bucket, bucket.acquire()

    def release(self, bucket: SlotBucket, slot: int) -> None:
        with self._lock:
            bucket.release(slot)


class SessionKV:
    """The cached keys/values of one sequence (one slot of a `KVPool`), and the token ids
    they were computed from. Without a pool it holds tokens only (runners that keep their
    own cache, like HFRunner)."""

    def __init__(self, pool: KVPool | None) -> None:
        self.pool = pool
        self.bucket: SlotBucket | None = None
        self.slot = -1
        self._finalizer: weakref.finalize | None = None
        self.token_ids: list[int] = []  # tokens whose KV is cached, in order

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def capacity(self) -> int:
        return self.bucket.capacity if self.bucket is not None else 0

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
        bucket, slot = self.pool.acquire(total)
        old, old_slot, n = self.bucket, self.slot, self.length
        if old is not None:
            for new_buf, old_buf in zip((*bucket.keys, *bucket.values), (*old.keys, *old.values)):
                new_buf[slot, :, :n] = old_buf[old_slot, :, :n]
            self._finalizer.detach()  # type: ignore[union-attr]
            self.pool.release(old, old_slot)
        self.bucket, self.slot = bucket, slot
        self._finalizer = weakref.finalize(self, self.pool.release, bucket, slot)

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
        assert self.bucket is not None and end <= self.capacity
        return (self.bucket.keys[layer][self.slot, :, start:end],
                self.bucket.values[layer][self.slot, :, start:end])

    def commit(self, token_ids: list[int]) -> None:
        """Record that KV for `token_ids` was written after the current length."""
        self.token_ids.extend(token_ids)

    def truncate(self, length: int) -> None:
        """Roll back to the first `length` tokens."""
        assert 0 <= length <= self.length, (length, self.length)
        del self.token_ids[length:]

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


class SessionTable:
    """session id -> per-session state, least recently used first, bounded in count.

    Evicting a session only costs a recomputation: callers resend tokens when the replica
    answers that it lacks them (needs_resync).
    """

    def __init__(self, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.max_sessions = max_sessions
        self._items: OrderedDict[str, object] = OrderedDict()

    def get(self, session_id: str) -> object | None:
        item = self._items.get(session_id)
        if item is not None:
            self._items.move_to_end(session_id)
        return item

    def put(self, session_id: str, item: object) -> None:
        self._items[session_id] = item
        self._items.move_to_end(session_id)
        while len(self._items) > self.max_sessions:
            self._items.popitem(last=False)

    def pop(self, session_id: str) -> None:
        self._items.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._items)


class HasTokens(Protocol):
    tokens: list[int]


S = TypeVar("S", bound=HasTokens)


def sync_session(table: SessionTable, session_id: str, prefix_len: int, tokens: list[int],
                 create: Callable[[], S]) -> S | None:
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
    return session  # type: ignore[return-value]
