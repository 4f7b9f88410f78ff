"""Per-session KV caches that roll back instead of rebuilding.

Each session owns one growable buffer per layer, [kv_heads, capacity, head_dim]. Appending
writes in place; attention reads a view of the first `length` positions, so a batched
forward never copies or concatenates another session's context. Rejection truncates the
length (O(1)); capacity grows by doubling, so growth copies are amortised O(1) per token.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch


class SessionKV:
    """The cached keys/values of one sequence, and the token ids they were computed from."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, capacity: int = 64) -> None:
        shape = (num_kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.token_ids: list[int] = []  # tokens whose KV is cached, in order

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def reserve(self, total: int) -> None:
        """Make room for `total` positions (doubling, copying only the valid prefix)."""
        if total <= self.capacity:
            return
        new_cap = max(total, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = torch.empty((old.shape[0], new_cap, old.shape[2]), dtype=old.dtype, device=old.device)
                new[:, : self.length] = old[:, : self.length]
                buffers[i] = new

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [kv_heads, t, head_dim] at positions start..start+t; return views of
        positions 0..start+t for attention."""
        end = start + k.shape[1]
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

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

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


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
