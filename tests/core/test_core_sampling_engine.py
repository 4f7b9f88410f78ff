"""Sampling through the engine: reproducible run to run for a fixed seed and settings, and
speculative sampling follows the target's distribution (not the draft's)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare
from tiny_models import REPEATS, fixed_spec, run

from specdec.core.engine import Engine
from specdec.core.request import RequestSpec
from specdec.core.sampling import SamplingParams, probs_from_logits
from tests.reference import contingency

# REPEATS repeats, and the n-gram drafter's proposal (37) has target probability ~0.27.
PROMPT = REPEATS
SEEDS = range(300)
TEMPERATURE, TOP_K = 1.0, 8


def sample_spec(drafter: str, seed: int, k: int = 4, max_new_tokens: int = 3, **kw) -> RequestSpec:
    kw = {"temperature": TEMPERATURE, "top_k": TOP_K, **kw}
    return fixed_spec(drafter, seed, max_new_tokens, k, **kw)


def complete_all(engine: Engine, specs: list[RequestSpec]):
    async def main():
        return await asyncio.gather(*[engine.complete_async(s) for s in specs])

    return run(main())


@pytest.fixture(scope="module")
def samples(engine) -> dict[str, list[list[int]]]:
    """The first 3 generated tokens for each seed, without and with speculation."""
    out = {}
    for drafter in ("none", "model:small", "ngram", "suffix"):
        results = complete_all(engine, [sample_spec(drafter, seed) for seed in SEEDS])
        out[drafter] = [r.token_ids for r in results]
        assert all(len(t) == 3 for t in out[drafter])
        if drafter != "none":
            assert 0 < sum(r.stats.accepted_tokens for r in results) < sum(r.stats.proposed_tokens for r in results)
    return out


def next_token_probs(model, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1:]
    return probs_from_logits(logits, params)[0]


def gof_pvalue(tokens: list[int], probs: torch.Tensor) -> float:
    counts = Counter(tokens)
    support = [int(t) for t in torch.nonzero(probs > 0).flatten()]
    assert set(counts) <= set(support), "sampled a token outside the top-k support"
    n = len(tokens)
    return float(chisquare([counts[t] for t in support], [float(probs[t]) * n for t in support]).pvalue)


def test_sampling_is_reproducible(engine) -> None:
    for drafter, k in [("none", 1), ("ngram", 3), ("suffix", 4), ("model:small", 4), ("model:small", 2)]:
        specs = [
            sample_spec(drafter, seed, k, max_new_tokens=30, temperature=0.9, top_k=40, top_p=0.95)
            for seed in (1, 2, 3)
        ]
        first = [engine.complete(s).token_ids for s in specs]
        second = complete_all(engine, specs)  # also: batching does not change a request's draws
        assert [r.token_ids for r in second] == first, drafter
        assert len({tuple(t) for t in first}) == 3, "different seeds should give different samples"


def test_first_token_follows_target_distribution(samples, target_model, draft_model) -> None:
    params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K)
    p = next_token_probs(target_model, PROMPT, params)
    q = next_token_probs(draft_model, PROMPT, params)
    for drafter, tokens in samples.items():
        assert gof_pvalue([t[0] for t in tokens], p) > 1e-3, drafter
    # Power: the draft puts real mass on a token outside the target's top-k (a sampler that
    # leaked draft tokens would emit it and fail the support check in gof_pvalue), and the
    # two distributions are far apart.
    assert float(q[p == 0].sum()) > 0.1
    assert float((p - q).abs().sum()) / 2 > 0.15


@pytest.mark.parametrize("drafter", ["model:small", "ngram", "suffix"])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_speculative_and_plain_samples_have_the_same_distribution(samples, position, drafter) -> None:
    rows = contingency([t[position] for t in samples["none"]], [t[position] for t in samples[drafter]])
    assert len(rows[0]) >= 3
    assert chi2_contingency(rows).pvalue > 1e-3
