"""What a batched pass costs, learned from the passes themselves.

The target tier's verify passes cost about `base_s + row_s * rows`: a fixed part (reading
the weights, per-layer overheads) and a part per token row. On a GPU `row_s` is near zero
up to hundreds of rows; on a CPU a row costs about as much as a plain token once a few
sequences share the pass. The draft controller (`core/adaptive.py`) needs both numbers to
know what a drafted token costs at the current load, so the verifier fits them online and
reports them with every verdict; nobody has to configure a row budget per machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from specdec.core.attention import GROUP_MAX_ROWS
from specdec.core.runner import ForwardItem

R = TypeVar("R")


class PassCost:
    """Exponentially weighted least-squares fit of pass time on rows over recent passes.

    Passes of different sizes (drafts of different lengths, sequences joining and leaving)
    pin down the slope; old passes fade, so the fit follows the load. Until the rows have
    varied enough to fit a slope, rows are taken as free (the optimistic prior: drafting
    then varies the rows, which teaches the slope)."""

    def __init__(self, weight: float = 0.05) -> None:
        self.weight = weight
        self.passes = 0
        self._x = self._y = self._xx = self._xy = 0.0
        self.row_s = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        w = 1.0 if self.passes == 0 else self.weight
        self.passes += 1
        self._x += w * (rows - self._x)
        self._y += w * (seconds - self._y)
        self._xx += w * (rows * rows - self._xx)
        self._xy += w * (rows * seconds - self._xy)
        variance = self._xx - self._x * self._x
        if variance > 1.0:  # rows have spread over more than about one row
            self.row_s = max(0.0, (self._xy - self._x * self._y) / variance)

    def timed(self, forward: Callable[[list[ForwardItem]], R], items: list[ForwardItem]) -> R:
        """Run a forward pass and learn from it. Only decode-like passes are fitted: a
        prefill's rows cost what its attention makes them cost, not what a drafted row does."""
        started = time.perf_counter()
        out = forward(items)
        if all(len(item.tokens) <= GROUP_MAX_ROWS for item in items):
            self.observe(sum(len(item.tokens) for item in items), time.perf_counter() - started)
        return out

    @property
    def base_s(self) -> float:
        return max(0.0, self._y - self.row_s * self._x)

    def predict(self, rows: int) -> float:
        """The fitted time of a decode-like pass over `rows` rows (0 before any pass)."""
        return self.base_s + self.row_s * rows if self.passes else 0.0


DEFAULT_PREFILL_CHUNK_S = 0.25  # a pass's prefill time budget (SPECDEC_PREFILL_CHUNK_S)
MIN_PREFILL_CHUNK = 16  # tokens: a prefill always advances by at least this much a pass
INITIAL_PREFILL_CHUNK = 64  # tokens of the first chunk, before any chunk was measured


class PrefillCost:
    """What a prefill chunk adds to a pass, fitted from the chunks themselves.

    A chunk of n tokens after `start` cached ones costs about `token_s * n` (projections and
    MLP, like any row) plus `pair_s * n * (start + n/2)` (attention: each of its tokens reads
    every key before it). On SmolLM2-135M on 2 cores a token at 6k of context cost 4x one at
    the start, so a fixed token count would either crawl early or blow the pass budget late.
    Both coefficients are fitted by exponentially weighted least squares over recent chunks
    (what the pass took beyond the decode rows' fitted cost); until two chunks at different
    contexts pin them down, a token is taken to cost what the last chunk's tokens cost. A
    chunk grows to at most twice the last one: a fit thrown off by a noisy pass (a busy
    machine) costs one short pass, not one long one."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.chunks = 0
        self._nn = self._np = self._pp = self._ny = self._py = 0.0
        self.token_s = 0.0
        self.pair_s = 0.0
        self.last_tokens = 0  # prompt tokens of the last pass measured

    @staticmethod
    def pairs(start: int, tokens: int) -> float:
        """Query-key pairs a chunk's attention computes (causal within the chunk)."""
        return tokens * (start + (tokens + 1) / 2)

    def observe(self, chunks: list[tuple[int, int]], seconds: float) -> None:
        """A pass ran `chunks` ([(start, tokens)]) and took `seconds` beyond its decode rows."""
        n = float(sum(tokens for _, tokens in chunks))
        p = sum(self.pairs(start, tokens) for start, tokens in chunks)
        if n <= 0:
            return
        seconds = max(seconds, 0.0)
        self.last_tokens = int(n)
        w = 1.0 if self.chunks == 0 else self.weight
        self.chunks += 1
        self._nn += w * (n * n - self._nn)
        self._np += w * (n * p - self._np)
        self._pp += w * (p * p - self._pp)
        self._ny += w * (n * seconds - self._ny)
        self._py += w * (p * seconds - self._py)
        det = self._nn * self._pp - self._np * self._np
        token_s = pair_s = -1.0
        if det > 1e-6 * self._nn * self._pp:  # the chunks' contexts differ enough to separate the terms
            token_s = (self._pp * self._ny - self._np * self._py) / det
            pair_s = (self._nn * self._py - self._np * self._ny) / det
        if token_s < 0 or pair_s < 0:  # not separable (yet), or noise: all of it per token
            token_s, pair_s = seconds / n, 0.0
        self.token_s, self.pair_s = token_s, pair_s

    def predict(self, start: int, tokens: int) -> float:
        return self.token_s * tokens + self.pair_s * self.pairs(start, tokens)

    def chunk_tokens(self, start: int, budget_s: float, initial: int) -> int:
        """The most tokens after `start` whose chunk fits in `budget_s` (at least
        MIN_PREFILL_CHUNK; `initial` before any chunk was measured)."""
        if self.chunks == 0 or self.token_s <= 0:
            return max(MIN_PREFILL_CHUNK, initial)
        if budget_s <= 0:  # the steps alone fill the pass
            return MIN_PREFILL_CHUNK
        # pair_s/2 n^2 + (token_s + pair_s (start + 1/2)) n = budget_s, for n
        a = self.pair_s / 2
        b = self.token_s + self.pair_s * (start + 0.5)
        n = budget_s / b if a <= 0 else (-b + (b * b + 4 * a * budget_s) ** 0.5) / (2 * a)
        return max(MIN_PREFILL_CHUNK, min(int(n), 2 * self.last_tokens))
