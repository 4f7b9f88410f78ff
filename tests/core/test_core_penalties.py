"""min_p and the presence / frequency / repetition penalties, exact under speculation: each
verified row is penalised by the tokens before it (accepted drafts included), so greedy
output equals plain decoding with the same penalties, and sampled output follows the same
distribution, with every drafter."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare
from tiny_models import REPEATS as PROMPT
from tiny_models import fixed_spec as spec
from tiny_models import run

from specdec.core.engine import Engine
from specdec.core.errors import InvalidArgument
from specdec.core.penalties import penalize
from specdec.core.request import RequestSpec
from specdec.core.sampling import SamplingParams, probs_from_logits
from tests.reference import contingency

DRAFTERS = ("none", "ngram", "model:small")
PENALTIES = {"presence_penalty": 0.4, "frequency_penalty": 0.6, "repetition_penalty": 1.6}
MILD = {"presence_penalty": 0.02, "frequency_penalty": 0.03, "repetition_penalty": 1.02}


def complete_all(engine: Engine, specs: list[RequestSpec]):
    async def main():
        return await asyncio.gather(*[engine.complete_async(s) for s in specs])

    return run(main())


def reference_penalize(logits: torch.Tensor, history: list[int], prompt_len: int, p: SamplingParams) -> torch.Tensor:
    """The definition, one token at a time (slow; for checking the vectorised version)."""
    out = logits.to(torch.float64).clone()
    output = Counter(history[prompt_len:])
    for token in set(history):
        if p.repetition_penalty != 1.0:
            x = out[token]
            out[token] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
    for token, count in output.items():
        out[token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalize_matches_the_definition_row_by_row() -> None:
    rng = random.Random(0)
    vocab = 50
    for trial in range(20):
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        n = rng.randrange(1, 6)
        base = rng.randrange(0, len(tokens) + 1)
        tokens += [rng.randrange(vocab) for _ in range(n - 1)]  # the drafts
        params = SamplingParams(
            presence_penalty=rng.uniform(-2, 2),
            frequency_penalty=rng.uniform(-2, 2),
            repetition_penalty=rng.choice([1.0, 0.7, 1.3, 2.0]),
            prompt_len=rng.randrange(0, base + 1),
        )
        logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(trial))
        got = penalize(logits, tokens, base, params)
        for j in range(n):
            want = reference_penalize(logits[j], tokens[: base + j], params.prompt_len, params)
            torch.testing.assert_close(got[j], want, rtol=0, atol=1e-12)


def test_min_p_keeps_tokens_within_a_factor_of_the_best() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, min_p=0.3))[0]
    full = torch.softmax(logits[0].double(), dim=-1)
    kept = full >= 0.3 * full.max()
    assert kept.tolist() == [True, True, False, False, False]
    torch.testing.assert_close(probs, torch.where(kept, full, 0.0) / full[kept].sum())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_p", 1.5),
        ("min_p", float("nan")),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
    ],
)
def test_bad_values_name_the_field(engine, field: str, value: float) -> None:
    with pytest.raises(InvalidArgument) as err:
        engine.complete(spec("none", **{field: value}))
    assert err.value.field == f"decoding.{field}"


def test_greedy_with_penalties_equals_plain_decoding(engine) -> None:
    """Greedy: every drafter gives plain decoding's tokens; the penalties change them (else
    the test would prove nothing), and plain decoding equals a step-by-step reference."""
    unpenalised = engine.complete(spec("none", max_new_tokens=40)).token_ids
    for penalties in (PENALTIES, MILD):  # mild: the output still repeats, so n-grams get accepted
        plain = engine.complete(spec("none", max_new_tokens=40, **penalties)).token_ids
        assert plain != unpenalised
        for drafter in DRAFTERS[1:]:
            accepted = 0
            for k in (1, 3, 6):
                result = engine.complete(spec(drafter, max_new_tokens=40, k=k, **penalties))
                assert result.token_ids == plain, (drafter, k, penalties)
                accepted += result.stats.accepted_tokens
            assert accepted > 0 or (drafter == "ngram" and penalties is PENALTIES), (drafter, penalties)


def test_greedy_plain_decoding_follows_the_definition(engine, target_model) -> None:
    params = SamplingParams(prompt_len=len(PROMPT), **PENALTIES)
    history = list(PROMPT)
    with torch.inference_mode():
        for _ in range(12):
            logits = target_model(input_ids=torch.tensor([history])).logits[0, -1]
            history.append(int(reference_penalize(logits, history, len(PROMPT), params).argmax()))
    assert engine.complete(spec("none", max_new_tokens=12, **PENALTIES)).token_ids == history[len(PROMPT) :]


SEEDS = range(300)
SAMPLED = {"temperature": 1.0, "top_k": 12, "min_p": 0.05, **PENALTIES}


@pytest.fixture(scope="module")
def samples(engine) -> dict[str, list[list[int]]]:
    out = {}
    for drafter in DRAFTERS:
        results = complete_all(engine, [spec(drafter, seed, **SAMPLED) for seed in SEEDS])
        out[drafter] = [r.token_ids for r in results]
        if drafter != "none":
            assert sum(r.stats.accepted_tokens for r in results) > 0, drafter
    return out


def test_first_token_follows_the_penalised_target(samples, target_model) -> None:
    """Position 0 is penalised by the prompt alone (repetition): the exact distribution."""
    params = SamplingParams(temperature=1.0, top_k=12, min_p=0.05, prompt_len=len(PROMPT), **PENALTIES)
    with torch.inference_mode():
        logits = target_model(input_ids=torch.tensor([PROMPT])).logits[0, -1:]
    p = probs_from_logits(penalize(logits, PROMPT, len(PROMPT), params), params)[0]
    assert not torch.equal(p, probs_from_logits(logits, params)[0]), "the penalty should matter here"
    support = [int(t) for t in torch.nonzero(p > 0).flatten()]
    for drafter, tokens in samples.items():
        counts = Counter(t[0] for t in tokens)
        assert set(counts) <= set(support), drafter
        n = len(tokens)
        assert chisquare([counts[t] for t in support], [float(p[t]) * n for t in support]).pvalue > 1e-3, drafter


@pytest.mark.parametrize("drafter", DRAFTERS[1:])
@pytest.mark.parametrize("position", [1, 2])
def test_later_positions_match_plain_sampling(samples, drafter: str, position: int) -> None:
    """Later positions are penalised by the tokens before them (drafts the target accepted
    among them): their distribution with speculation equals plain decoding's."""
    rows = contingency([t[position] for t in samples["none"]], [t[position] for t in samples[drafter]])
    assert len(rows[0]) >= 3
    assert chi2_contingency(rows).pvalue > 1e-3


def test_sampled_penalties_are_reproducible_across_drafters_batching(engine) -> None:
    specs = [spec("model:small", seed, max_new_tokens=20, **SAMPLED) for seed in (1, 2, 3)]
    first = [engine.complete(s).token_ids for s in specs]
    assert [r.token_ids for r in complete_all(engine, specs)] == first
