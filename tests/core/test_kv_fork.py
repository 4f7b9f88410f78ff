"""Sessions sharing a prompt fork its KV rows instead of computing them (core/kv_fork.py):
the rows equal computed ones, the prompt is computed about once, and every verdict is
the one a session computing its own prompt gets."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import VOCAB, IdTokenizer, run

from specdec.core.batcher import NotYet
from specdec.core.drafters.worker import DraftWorker
from specdec.core.generation import generate
from specdec.core.interfaces import Tiers
from specdec.core.kv_fork import PrefixForks
from specdec.core.local import LocalDrafter, LocalVerifier
from specdec.core.loop import GenerationRequest
from specdec.core.runner import ForwardItem, ModelRunner, build_runner
from specdec.core.sampling import SamplingParams
from specdec.core.target import TargetWorker
from specdec.core.types import Verdict, VerifyItem


def tokens(seed: int, n: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(VOCAB) for _ in range(n)]


def test_copy_prefix_rows_equal_computed_ones(target_model) -> None:
    runner = ModelRunner(target_model)
    seq = tokens(3, 150)
    source = runner.new_kv()
    runner.forward([ForwardItem(source, seq[:120], 0)])
    forked = runner.new_kv()
    runner.forward([ForwardItem(forked, tokens(4, 10), 0)])  # content that the copy replaces
    forked.copy_prefix(source, 100)
    assert forked.token_ids == seq[:100] and forked.capacity >= 100
    for layer in range(runner.pool.num_layers):
        for mine, theirs in zip(forked.read(layer, 0, 100), source.read(layer, 0, 100)):
            assert torch.equal(mine, theirs)
    fresh = runner.new_kv()
    (want,) = runner.forward([ForwardItem(fresh, seq, 50)])
    (got,) = runner.forward([ForwardItem(forked, seq[100:], 50)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _until_done(worker: TargetWorker, items: list[VerifyItem]) -> tuple[list[Verdict], list[int]]:
    """Verify the items as the batcher would (NOT_YET ones again, next pass) -> (verdicts,
    the pass in which each got its verdict)."""
    verdicts: dict[int, Verdict] = {}
    passes: dict[int, int] = {}
    pending = list(range(len(items)))
    for n in range(20):
        out = worker.verify_batch([items[i] for i in pending])
        for i, v in zip(pending, out):
            if not isinstance(v, NotYet):
                assert isinstance(v, Verdict)
                verdicts[i], passes[i] = v, n
        pending = [i for i, v in zip(pending, out) if isinstance(v, NotYet)]
        if not pending:
            break
    return [verdicts[i] for i in range(len(items))], [passes[i] for i in range(len(items))]


@pytest.mark.parametrize("chunk", [0, 32])
def test_siblings_in_one_batch_compute_the_prompt_once(target_model, chunk) -> None:
    prompt = tokens(5, 120)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.8, seed=8)]
    items = [
        VerifyItem(f"s{i}", 0, prompt, tokens(10 + i, 3), None, params[i % len(params)], logprobs=2) for i in range(4)
    ]
    worker = TargetWorker(build_runner(target_model), prefill_chunk_tokens=chunk)
    verdicts, passes = _until_done(worker, items)
    assert passes[0] < min(passes[1:])  # the first computes, the others wait for it and fork
    assert worker.stats.prefill_tokens == len(prompt) - 1
    assert worker.stats.forked_tokens == 3 * (len(prompt) - 1)
    for item, verdict in zip(items, verdicts):  # what a worker computing the prompt itself answers
        alone = TargetWorker(build_runner(target_model), prefill_chunk_tokens=chunk)
        (want,) = _until_done(alone, [item])[0]
        assert (verdict.tokens, verdict.num_accepted) == (want.tokens, want.num_accepted)
        for mine, theirs in zip(verdict.logprobs, want.logprobs):
            assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-5)
        assert alone.stats.forked_tokens == 0


def test_hold_back_only_waits_for_a_sibling_computing_the_prefix(target_model) -> None:
    runner = build_runner(target_model)
    forks = PrefixForks()
    prompt, other = tokens(6, 80), tokens(7, 80)
    a, b, c, d = (runner.new_kv() for _ in range(4))
    short = tokens(8, 20)
    assert forks.hold_back([(a, prompt), (b, prompt), (c, other), (d, prompt[:10] + other[10:]), (None, short)]) == [
        False,
        True,  # same prompt as a: waits
        False,
        False,  # shares only 10 tokens (and another key)
        False,
    ]
    assert forks.fork(a, prompt) == 0  # before its prefill: nothing to fork from, but remembered
    runner.forward([ForwardItem(a, prompt[:-1], 0)])
    assert forks.hold_back([(a, prompt), (b, prompt)]) == [False, False]  # a holds it now: b forks
    assert forks.fork(b, prompt) == len(prompt) - 1 and b.token_ids == prompt[:-1]
    assert forks.fork(c, prompt[:40] + other[40:]) == 40  # a shorter common prefix, still >= 32
    del a, b  # released sessions are not forked from
    assert forks.fork(runner.new_kv(), prompt) == 40  # c holds 40 of them


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_n_choices_through_the_loop_equal_separate_requests(target_model, draft_model, temperature) -> None:
    """Four requests with one prompt (as the HTTP front's n=4), drafting with the model
    drafter: the target and the drafter compute the prompt about once, and each output is
    the one the same request gets alone."""
    prompt = tokens(9, 100)

    def requests() -> list[GenerationRequest]:
        return [
            GenerationRequest(
                f"n{j}",
                prompt,
                12,
                SamplingParams(temperature=temperature, seed=40 + j),
                drafter="model:small",
                max_draft_tokens=3,
                adaptive=False,
            )
            for j in range(4)
        ]

    def serve() -> tuple[TargetWorker, DraftWorker, Tiers]:
        target, draft = TargetWorker(build_runner(target_model)), DraftWorker(build_runner(draft_model), "small")
        return target, draft, Tiers(LocalVerifier(target), LocalDrafter(draft))

    target, draft, tiers = serve()

    async def together():
        import asyncio

        return await asyncio.gather(*[generate(r, tiers, IdTokenizer(), []) for r in requests()])

    results = run(together())
    assert target.stats.forked_tokens == 3 * (len(prompt) - 1)
    assert target.stats.prefill_tokens == len(prompt) - 1
    model = draft.methods["model:small"]
    assert model.forks.forked_tokens == 3 * (len(prompt) - 1)  # type: ignore[attr-defined]
    for request, result in zip(requests(), results):
        _, _, alone = serve()
        want = run(generate(request, alone, IdTokenizer(), []))
        assert result.token_ids == want.token_ids
