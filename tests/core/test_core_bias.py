"""logit_bias and min_tokens, exact under speculation: processed on every verified row as
the penalties are (before them, as vLLM does), so greedy output equals plain decoding with
the same settings and sampled output follows the same distribution, with every drafter."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from scipy.stats import chi2_contingency
from tiny_models import fixed_spec as spec
from tiny_models import run

from specdec.core.engine import Engine
from specdec.core.errors import InvalidArgument
from specdec.core.penalties import biased, penalize
from specdec.core.sampling import SamplingParams
from tests.reference import contingency

DRAFTERS = ("none", "ngram", "model:small")


def test_biased_matches_the_definition_row_by_row() -> None:
    rng = random.Random(1)
    vocab = 40
    for trial in range(20):
        n, prompt_len = rng.randrange(1, 6), rng.randrange(0, 8)
        base = prompt_len + rng.randrange(0, 8)
        bias = tuple(sorted({rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(rng.randrange(0, 5))}.items()))
        masked = tuple(sorted({rng.randrange(vocab) for _ in range(3)}))
        params = SamplingParams(prompt_len=prompt_len, logit_bias=bias, min_tokens=rng.randrange(0, 10))
        params = SamplingParams(**{**params.__dict__, "min_tokens_ids": masked})
        logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(trial), dtype=torch.float64)
        before = logits.clone()
        got = biased(logits, base, params)
        assert torch.equal(logits, before), "the caller's logits are left alone"
        for j in range(n):
            want = before[j].clone()
            for token, b in bias:
                want[token] += b
            if base + j - prompt_len < params.min_tokens:
                want[list(masked)] = -torch.inf
            torch.testing.assert_close(got[j], want, rtol=0, atol=1e-12)
        assert params.penalized == bool(bias or (params.min_tokens and masked))
        torch.testing.assert_close(penalize(logits, list(range(base + n)), base, params), got)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"logit_bias": {5: 150.0}}, "decoding.logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "decoding.logit_bias"),
        ({"logit_bias": {100000: 1.0}}, "decoding.logit_bias"),  # not a token of the model
        ({"min_tokens": -1}, "decoding.min_tokens"),
        ({"min_tokens": 4}, "decoding.min_tokens"),  # more than max_new_tokens
    ],
)
def test_bad_values_name_the_field(engine, fields, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        engine.complete(spec("none", **fields))
    assert err.value.field == field


def test_tiers_check_the_ids_against_their_vocabulary() -> None:
    from specdec.core.checks import check_delta

    params = SamplingParams(logit_bias=((300, 1.0),))
    check_delta(0, params)  # no vocabulary known: the range checks only
    with pytest.raises(InvalidArgument) as err:
        check_delta(0, params, 256)
    assert err.value.field == "sampling.logit_bias"
    with pytest.raises(InvalidArgument) as err:
        check_delta(0, SamplingParams(min_tokens=2, min_tokens_ids=(256,)), 256)
    assert err.value.field == "sampling.min_tokens_ids"


def _settings(engine: Engine) -> dict:
    """A bias against plain decoding's favourite tokens and for another, and min_tokens
    holding back stop tokens plain decoding would emit early."""
    plain = engine.complete(spec("none", max_new_tokens=24)).token_ids
    favourite = max(set(plain), key=plain.count)
    stops = sorted(set(plain[:4]) - {favourite})[:2]
    return {
        "logit_bias": {favourite: -4.0, (favourite + 1) % 256: 3.0},
        "min_tokens": 10,
        "stop_token_ids": stops,
    }


def test_greedy_with_bias_and_min_tokens_equals_plain_decoding(engine) -> None:
    settings = _settings(engine)
    without = engine.complete(spec("none", max_new_tokens=24, stop_token_ids=settings["stop_token_ids"]))
    plain = engine.complete(spec("none", max_new_tokens=24, **settings))
    assert len(without.token_ids) < 10, "the stop tokens would end the text early"
    assert len(plain.token_ids) >= 10 and not set(plain.token_ids[:9]) & set(settings["stop_token_ids"])
    for drafter in DRAFTERS[1:]:
        for k in (1, 4):
            result = engine.complete(spec(drafter, max_new_tokens=24, k=k, **settings))
            assert result.token_ids == plain.token_ids, (drafter, k)
            assert result.finish_reason == plain.finish_reason


SEEDS = range(300)


def test_sampled_positions_match_plain_sampling(engine) -> None:
    settings = {**_settings(engine), "min_tokens": 3, "temperature": 1.0, "top_k": 12}

    async def sample(drafter: str) -> list[list[int]]:
        results = await asyncio.gather(
            *[engine.complete_async(spec(drafter, seed, max_new_tokens=3, **settings)) for seed in SEEDS]
        )
        if drafter != "none":
            assert sum(r.stats.accepted_tokens for r in results) > 0, drafter
        return [r.token_ids for r in results]

    samples = {d: run(sample(d)) for d in DRAFTERS}
    masked = set(settings["stop_token_ids"])
    for drafter in DRAFTERS[1:]:
        assert all(len(t) == 3 and not set(t) & masked for t in samples[drafter])  # min_tokens held them back
        for position in range(3):
            rows = contingency([t[position] for t in samples["none"]], [t[position] for t in samples[drafter]])
            assert len(rows[0]) >= 3
            assert chi2_contingency(rows).pvalue > 1e-3, (drafter, position)
