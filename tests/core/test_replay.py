"""The offline replay: each drafter commits exactly the known greedy output, repetitive
text is drafted (more than a token a step), and the floor keeps a model-free drafter
drafting after a run of misses."""

from __future__ import annotations

import random

from specdec.benchmarks.replay import replay
from specdec.core.adaptive import StepCosts
from specdec.core.drafters.registry import DRAFTERS

COST = StepCosts(pass_base_s=0.0225, row_s=0.0013)


def sequences() -> list[dict]:
    rnd = random.Random(0)
    noise = [rnd.randrange(1000) for _ in range(120)]  # nothing repeats: every draft misses
    verse = [rnd.randrange(1000) for _ in range(12)]
    return [
        {"kind": "noise", "prompt": noise[:20], "output": noise[20:]},
        {"kind": "copy", "prompt": verse + [7], "output": (verse * 6)[:60]},
        {"kind": "copy", "prompt": noise[:5] + [7], "output": noise[:5] + (verse * 6)[:40]},
    ]


def test_replay_commits_the_output_and_drafts_repeats() -> None:
    for name in ("ngram", "suffix", "suffix-chain"):
        got = replay(sequences(), DRAFTERS[name], 12, True, COST)
        assert got.by_kind["noise"].tokens == 100 and got.by_kind["copy"].tokens == 105
        assert got.by_kind["copy"].steps < 40, name  # the copies are drafted several tokens a step
        assert got.by_kind["noise"].speedup > 0.9  # misses cost little: the floor drafts one token
    without = replay(sequences(), DRAFTERS["suffix"], 12, False, COST).by_kind["copy"].steps
    assert replay(sequences(), DRAFTERS["suffix"], 12, True, COST).by_kind["copy"].steps <= without
