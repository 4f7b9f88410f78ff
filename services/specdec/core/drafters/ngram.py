"""Model-free drafting by prompt lookup (n-gram matching over the sequence so far).

The last n tokens are searched for earlier in the sequence (longest n first, most recent
match first); the tokens that followed that match are proposed. Deterministic, so its
draft distribution is one-hot.
"""
from __future__ import annotations


def ngram_propose(tokens: list[int], k: int, max_ngram: int = 4, min_ngram: int = 1) -> list[int]:
    """Up to k tokens continuing the latest earlier occurrence of the sequence's tail."""
    if k <= 0:
        return []
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = tokens[length - n:]
        # Scan right to left: the most recent occurrence predicts best.
        for start in range(length - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                follow = tokens[start + n:start + n + k]
                if follow:
                    return follow
    return []
