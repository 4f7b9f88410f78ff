"""Incremental detokenization: the time of one step's `add` as the output grows, decoding
the whole output every step (the previous implementation, kept here as the reference the
tests compare against) vs the windowed detokenizer (core/detokenize.py), side by side.

    python -m specdec.benchmarks.detok_bench [--tokens 100,1000,4000] [--step 1] [--model smollm2-135m]

The output is real text (several scripts, emoji) in the model's tokenizer, fed `step`
tokens an add, with a stop string that never occurs (so the hold-back runs every step);
each figure is the median over the last 32 steps before the output reaches that length.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from specdec.core.detokenize import IncrementalDetokenizer, TextDelta
from specdec.core.tokenizer import Decoder

SAMPLE = (
    "The quick brown fox jumps over the lazy dog. Héllo wörld, ça va? 你好世界，今天天气很好。"
    "🤖👍🏽 emoji 🇫🇷 and code:\n    return x ** 2  # ∑ √ ≠\nΕλληνικά, русский, العربية. "
)
STOP = "<|never|>"
SPAN = 32  # steps per figure


class WholeDecodeDetokenizer:
    """The previous implementation: decodes every id of the output each step (quadratic in
    the output's length). The reference for tests/core/test_detokenize_window.py."""

    def __init__(self, tokenizer: Decoder, stop_strings: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self._holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already released
        self.text = ""  # all released text

    def add(self, token_ids: list[int], final: bool = False) -> TextDelta:
        self._ids.extend(token_ids)
        full = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        assert isinstance(full, str)
        hits = [at for stop in self.stop_strings if (at := full.find(stop, max(0, self._emitted - len(stop)))) != -1]
        if hits:
            return self._release(full[: min(hits)], stopped=True)
        if final:
            return self._release(full)
        end = len(full) - self._holdback
        while end > self._emitted and full[end - 1] == "\ufffd":
            end -= 1
        return self._release(full[: max(end, self._emitted)])

    def _release(self, upto: str, stopped: bool = False) -> TextDelta:
        delta = upto[self._emitted :]
        self._emitted = max(self._emitted, len(upto))
        self.text += delta
        return TextDelta(delta, stopped)


Detokenizer = IncrementalDetokenizer | WholeDecodeDetokenizer


def step_times(make: Callable[[], Detokenizer], ids: list[int], points: list[int], step: int) -> dict[int, float]:
    """Median seconds of one add just before the output reaches each of `points` tokens."""
    detok, times = make(), []
    for start in range(0, max(points), step):
        began = time.perf_counter()
        detok.add(ids[start : start + step])
        times.append(time.perf_counter() - began)
    return {n: statistics.median(times[max(0, n // step - SPAN) : n // step]) for n in points}


def detok_bench(model: str, points: list[int], step: int) -> list[tuple[int, float, float]]:
    from specdec.core.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    piece = tokenizer.encode(SAMPLE, add_special_tokens=False)
    ids = piece * (max(points) // len(piece) + 2)
    old = step_times(lambda: WholeDecodeDetokenizer(tokenizer, [STOP]), ids, points, step)
    new = step_times(lambda: IncrementalDetokenizer(tokenizer, [STOP]), ids, points, step)
    check_old, check_new = WholeDecodeDetokenizer(tokenizer, [STOP]), IncrementalDetokenizer(tokenizer, [STOP])
    for start in range(0, max(points), step):  # the same text, step by step
        assert check_old.add(ids[start : start + step]) == check_new.add(ids[start : start + step])
    return [(n, old[n], new[n]) for n in points]


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m specdec.benchmarks.detok_bench", description=doc)
    parser.add_argument("--model", default="smollm2-135m", help="whose tokenizer")
    parser.add_argument("--tokens", default="100,1000,4000", help="output lengths to time a step at")
    parser.add_argument("--step", type=int, default=1, help="tokens an add (a step's committed tokens)")
    args = parser.parse_args(argv)
    points = sorted({int(n) for n in args.tokens.split(",")})
    if points[0] < 1 or args.step < 1:
        parser.error("--tokens and --step must be positive")
    rows = detok_bench(args.model, points, args.step)
    print(f"{args.model} tokenizer, {args.step} token(s) a step: one step's add, median of {SPAN} steps")
    print(f"{'output tokens':>14} {'whole decode (us)':>18} {'window (us)':>12} {'ratio':>8}")
    for n, old, new in rows:
        print(f"{n:>14} {old * 1e6:>18.1f} {new * 1e6:>12.1f} {old / new:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
