"""logprobs under speculation: each committed token's log-probability (and the top-n
alternatives) is the target's raw distribution at that position, whichever drafter
proposed it and however many rows shared the verify pass: equal to a teacher-forced
forward pass of the model over the final sequence, and to plain decoding, to 1e-5."""

from __future__ import annotations

import pytest
import torch
from tiny_models import run

from specdec.core.engine import Engine
from specdec.core.request import RequestSpec

PROMPT = [215, 20, 132, 248, 207, 155] * 3  # repetitive: the n-gram drafter gets accepted drafts
NEW_TOKENS = 24
TOP = 4


def _complete(engine: Engine, drafter: str, temperature: float, logprobs: int | None = TOP, k: int = 4):
    async def main():
        try:
            return await engine.complete_async(
                RequestSpec(
                    token_ids=list(PROMPT),
                    max_new_tokens=NEW_TOKENS,
                    ignore_eos=True,
                    drafter=drafter,
                    max_draft_tokens=k,
                    adaptive=False,
                    temperature=temperature,
                    seed=11,
                    logprobs=logprobs,
                )
            )
        finally:
            await engine.aclose()

    return run(main())


def _teacher_forced(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab] log-softmax at each generated position, from one forward pass."""
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT + tokens])).logits[0].double()
    return torch.log_softmax(logits, -1)[len(PROMPT) - 1 : len(PROMPT) - 1 + len(tokens)]


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
@pytest.mark.parametrize("drafter", ["none", "ngram", "model:small"])
def test_logprobs_are_the_targets_own(engine, target_model, drafter, temperature):
    result = _complete(engine, drafter, temperature)
    assert len(result.logprobs) == len(result.token_ids) == NEW_TOKENS
    if drafter != "none":  # drafts were verified in multi-row passes (and, greedy, kept)
        assert result.stats.proposed_tokens > 0 and (temperature > 0 or result.stats.accepted_tokens > 0)
    ref = _teacher_forced(target_model, result.token_ids)
    got = torch.tensor([t.logprob for t in result.logprobs], dtype=torch.float64)
    assert torch.allclose(got, ref[torch.arange(NEW_TOKENS), torch.tensor(result.token_ids)], atol=1e-5, rtol=0)
    for row, t in zip(ref, result.logprobs):
        values, ids = row.topk(TOP)
        assert [i for i, _ in t.top] == ids.tolist()  # the same alternatives, most likely first
        assert torch.allclose(torch.tensor([v for _, v in t.top], dtype=torch.float64), values, atol=1e-5, rtol=0)


def test_greedy_logprobs_with_speculation_equal_plain_decoding(engine):
    plain = _complete(engine, "none", 0.0)
    for drafter, k in (("ngram", 1), ("ngram", 6), ("model:small", 3)):
        spec = _complete(engine, drafter, 0.0, k=k)
        assert spec.token_ids == plain.token_ids
        for a, b in zip(spec.logprobs, plain.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [i for i, _ in a.top] == [i for i, _ in b.top]


def test_no_logprobs_unless_asked_and_top_zero_is_the_token_alone(engine):
    assert _complete(engine, "ngram", 0.0, logprobs=None).logprobs == []
    alone = _complete(engine, "ngram", 0.0, logprobs=0).logprobs
    assert len(alone) == NEW_TOKENS and all(t.top == [] for t in alone)
