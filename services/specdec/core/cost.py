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
