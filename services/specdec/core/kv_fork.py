"""Prompt KV shared between sessions of one replica: the n > 1 choices of one request (and
any other sessions that start with the same long prefix) compute its rows once.

A new session's cache is empty; if another live session's cache already holds a long
prefix of its committed tokens, the rows are copied (`SessionKV.copy_prefix`: one copy
per layer, no model compute) instead of being computed. The copied rows are those the
other session computed for the very same tokens at the very same positions, so the
session's logits are what its own prefill would have given.

Sessions that arrive together (one batch) find nothing to fork yet: `hold_back` picks
one of them to compute the shared prefix in this pass and asks the others to wait a pass
(the target answers them `NOT_YET`, the batcher runs them again next), when they fork.

Only caches of one pool (one replica's runner) can be forked: siblings routed to other
replicas compute their own prompt (the coordinator routes a request's choices together).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence

from specdec.core.kv_cache import SessionKV

FORK_MIN_TOKENS = 32  # fewer rows than this are computed (a copy saves little; steps never look)
KEY_TOKENS = 16  # the index is keyed by a prefix's first tokens
MAX_KEYS = 256  # distinct keys remembered (least recently used dropped)
PER_KEY = 4  # caches remembered per key (the newest)


class PrefixForks:
    """A small index of recent prefilling sessions' caches, by their first tokens (weak
    references: a released session's slot is not held by the index). Cost per item and
    pass: nothing for a step (it feeds fewer than `min_tokens` rows), one dict lookup and
    up to PER_KEY prefix comparisons for a prefill."""

    def __init__(self, min_tokens: int = FORK_MIN_TOKENS, max_keys: int = MAX_KEYS) -> None:
        """`min_tokens`: the fewest rows worth forking (SPECDEC_KV_FORK_TOKENS); 0 turns forking off."""
        if 0 < min_tokens < KEY_TOKENS or min_tokens < 0:
            raise ValueError(f"min_tokens must be 0 (off) or >= {KEY_TOKENS}, got {min_tokens}")
        self.min_tokens, self.max_keys = min_tokens, max_keys
        self._index: OrderedDict[tuple[int, ...], list[weakref.ref[SessionKV]]] = OrderedDict()
        self.forked_tokens = 0  # rows copied instead of computed, running total

    def fork(self, kv: SessionKV, committed: list[int]) -> int:
        """Before a pass computes `committed[kv.length:-1]` into `kv` (after the cache was
        rolled back or restored): if another cache holds at least `min_tokens` more of that
        prefix, copy its rows. Remembers `kv` as a source for later sessions. Returns the
        rows copied (kv.length grew by as much)."""
        prompt = committed[:-1]  # the newest committed token is fed with the drafts
        if not self.min_tokens or not kv.has_buffers or len(prompt) - kv.length < self.min_tokens:
            return 0  # a step (or a short prompt): nothing worth forking
        key = tuple(prompt[:KEY_TOKENS])
        source, n = self._best(key, prompt, kv)
        copied = 0
        if source is not None and n - kv.length >= self.min_tokens:
            copied = n - kv.length
            kv.copy_prefix(source, n)
            self.forked_tokens += copied
        self._remember(key, kv)
        return copied

    def hold_back(self, pending: Sequence[tuple[SessionKV | None, list[int]]]) -> list[bool]:
        """For one pass's items in order (cache, committed tokens): which wait a pass,
        because an earlier item of this pass computes rows of a prefix they share (at
        least `min_tokens` more than they hold) that nothing cached can give them now.
        A prompt prefilled in chunks keeps its siblings waiting until its last chunk."""
        held = [False] * len(pending)
        if not self.min_tokens:
            return held
        leaders: dict[tuple[int, ...], list[int]] = {}  # items of this pass computing prompt rows
        for i, (kv, committed) in enumerate(pending):
            prompt = committed[:-1]
            if kv is None or not kv.has_buffers or len(prompt) < KEY_TOKENS:
                continue
            cached = kv.common_prefix(prompt)
            if cached == len(prompt):
                continue  # a step: computes no prompt rows
            key = tuple(prompt[:KEY_TOKENS])
            if len(prompt) - cached >= self.min_tokens:
                have = max(cached, self._best(key, prompt, kv)[1])
                for j in leaders.get(key, ()):
                    shared = _common(pending[j][1][:-1], prompt)
                    if shared > have and shared - cached >= self.min_tokens:
                        held[i] = True
                        break
            if not held[i]:
                leaders.setdefault(key, []).append(i)
        return held

    def _best(self, key: tuple[int, ...], prompt: list[int], kv: SessionKV) -> tuple[SessionKV | None, int]:
        """The remembered cache (not `kv`, same pool) holding the longest prefix of `prompt`."""
        best, best_n = None, 0
        for ref in self._index.get(key, ()):
            source = ref()
            if source is None or source is kv or source.pool is not kv.pool:
                continue
            n = source.common_prefix(prompt)
            if n > best_n:
                best, best_n = source, n
        return best, best_n

    def _remember(self, key: tuple[int, ...], kv: SessionKV) -> None:
        refs = [r for r in self._index.pop(key, []) if r() is not None and r() is not kv]
        self._index[key] = [*refs[-(PER_KEY - 1) :], weakref.ref(kv)]
        while len(self._index) > self.max_keys:
            self._index.popitem(last=False)


def _common(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i
