"""Draft-length control from a request's own acceptance history.

Grow k by one after a fully accepted draft; otherwise move it halfway towards what was
actually accepted plus one. A cheap, stable rule: long drafts only while they pay.
"""
from __future__ import annotations


class DraftLength:
    def __init__(self, max_k: int, adaptive: bool, start: int | None = None) -> None:
        if max_k < 0:
            raise ValueError("max_k must be >= 0")
        self.max_k = max_k
        self.adaptive = adaptive
        self.k = max_k if start is None else min(start, max_k)

    def update(self, proposed: int, accepted: int) -> None:
        if not self.adaptive or proposed == 0:
            return
        if accepted == proposed:
            self.k = min(self.max_k, self.k + 1)
        else:
            self.k = max(1, (self.k + accepted + 2) // 2)
