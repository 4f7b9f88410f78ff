"""Model-free drafting by prompt lookup (n-gram matching over the sequence so far).

The last n tokens are searched for earlier in the sequence (longest n first, most recent
match first); the tokens that followed that match are proposed. Deterministic, so its
draft distribution is one-hot. Vectorised: one pass finds every earlier occurrence of the
last token, then match lengths grow by comparing one step further back for all at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from specdec.core.types import Proposal

if TYPE_CHECKING:
    from specdec.core.drafters.base import DraftRow, DraftSession
    from specdec.core.prefix_store import PrefixStore
    from specdec.core.runner import Runner


def ngram_propose(tokens: list[int], k: int, max_ngram: int = 4, min_ngram: int = 1) -> list[int]:
    """Up to k tokens continuing the latest earlier occurrence of the sequence's tail."""
    length = len(tokens)
    if k <= 0 or length < 2:
        return []
    seq = np.asarray(tokens)
    ends = np.flatnonzero(seq[:-1] == seq[-1])  # where an earlier match of the tail would end
    if ends.size == 0:
        return []
    lengths = np.ones(ends.size, dtype=np.int64)
    alive = np.ones(ends.size, dtype=bool)
    for back in range(1, min(max_ngram, length - 1)):
        starts = ends - back
        alive &= starts >= 0
        alive[alive] = seq[starts[alive]] == seq[length - 1 - back]
        lengths += alive
    best = int(lengths.max())
    if best < min_ngram:
        return []
    end = int(ends[np.flatnonzero(lengths == best)[-1]])  # the most recent of the longest
    return tokens[end + 1 : end + 1 + k]


class NgramDrafter:
    """Prompt lookup over the session's own tokens: no model, no state of its own."""

    kind: ClassVar[str] = "ngram"
    needs_model: ClassVar[bool] = False

    def __init__(self) -> None:
        self.name = self.kind

    @classmethod
    def create(cls, runner: Runner | None, model_name: str, prefix_store: PrefixStore | None) -> NgramDrafter:
        return cls()

    def propose(self, rows: list[DraftRow]) -> list[Proposal]:
        return [Proposal(ngram_propose(_context(session), item.num_tokens)) for session, item in rows]

    def learn(self, session: DraftSession, committed: list[int]) -> None:
        pass  # the lookup reads the session's tokens afresh each time

    def release(self, session: DraftSession) -> None:
        pass


def _context(session: DraftSession) -> list[int]:
    """The tokens a draft continues: the committed ones, then any forced draft prefix."""
    return session.tokens + session.draft_prefix if session.draft_prefix else session.tokens
