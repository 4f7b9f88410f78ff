"""The seam between per-session KV caches and a shared, surviving KV tier.

A `PrefixStore` (implemented outside the core, e.g. in Redis by `specdec.state.kv_store`)
holds KV for whole chunks of token prefixes. Workers ask it to `restore` before computing
a prefix they lack, and `offer` it what they computed. Both calls come from the worker
thread, must be cheap when there is nothing to do, and must never raise for store trouble:
a store that is down is a store that misses.
"""

from __future__ import annotations

from typing import Protocol

from specdec.core.kv_cache import SessionKV
from specdec.core.kv_fork import PrefixForks


class PrefixStore(Protocol):
    def restore(self, tokens: list[int], kv: SessionKV) -> int:
        """`kv` holds KV for a prefix of `tokens`; extend it with stored KV of whole chunks
        of `tokens` (stopping at the first missing one). Returns how many tokens the cache
        grew by (0 = miss). Never restores past len(tokens)."""
        ...

    def offer(self, tokens: list[int], kv: SessionKV) -> None:
        """`tokens` are committed and `kv` holds KV for a prefix of them: save the chunks
        that became complete (asynchronously, off the hot path)."""
        ...


def prepare_cache(
    kv: SessionKV, committed: list[int], store: PrefixStore | None, forks: PrefixForks | None = None
) -> int:
    """Make `kv` hold the longest known prefix of the committed tokens, all but the newest
    (that one is fed with the next step): roll back what diverges, copy what a live session
    of this replica holds (`forks`: cheaper than a store read), then extend from the store.
    The rest must be fed. Returns the rows copied from another session."""
    kv.truncate(min(kv.common_prefix(committed), len(committed) - 1))
    forked = forks.fork(kv, committed) if forks is not None else 0
    if store is not None:
        store.restore(committed[:-1], kv)
    return forked
