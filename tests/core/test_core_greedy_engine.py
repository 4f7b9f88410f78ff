"""Greedy speculative decoding gives exactly the target's own tokens: at every draft
length, with the n-gram and model drafters, batched with other requests, after losing
session state, with either runner."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tiny_models import IdTokenizer, run

from specdec.core.drafters.worker import DraftWorker
from specdec.core.engine import Engine
from specdec.core.generation import generate
from specdec.core.interfaces import Tiers
from specdec.core.local import LocalDrafter, LocalVerifier
from specdec.core.loop import GenerationRequest
from specdec.core.request import RequestSpec
from specdec.core.runner import HFRunner, build_runner
from specdec.core.sampling import SamplingParams
from specdec.core.target import TargetWorker

NEW_TOKENS = 40
# Repetitive prompts (n-gram acceptance > 0 on this target for every draft length) and a
# random one.
REPETITIVE = [[215, 20, 132, 248, 207, 155] * 3, [183, 111, 71, 144, 71, 48] * 3]
PROMPTS = REPETITIVE + [[9, 200, 31, 77, 4, 250, 18]]
DRAFT_LENGTHS = range(1, 9)


def spec(prompt: list[int], drafter: str, k: int = 4, **kw) -> RequestSpec:
    return RequestSpec(
        token_ids=list(prompt),
        max_new_tokens=kw.pop("max_new_tokens", NEW_TOKENS),
        ignore_eos=True,
        drafter=drafter,
        max_draft_tokens=k,
        adaptive=kw.pop("adaptive", False),
        **kw,
    )


@pytest.fixture(scope="module")
def hf_greedy(target_model) -> dict[tuple[int, ...], list[int]]:
    out = {}
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            gen = target_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
            )
            out[tuple(prompt)] = gen[0, len(prompt) :].tolist()
            assert len(out[tuple(prompt)]) == NEW_TOKENS
    return out


@pytest.fixture(scope="module")
def engine_small(target_model, draft_model, tokenizer) -> Engine:
    return Engine(target_model, tokenizer, drafter="ngram", draft_model=draft_model, draft_model_name="small")


@pytest.fixture(scope="module")
def engine_self(target_model, tokenizer) -> Engine:
    return Engine(target_model, tokenizer, drafter="ngram", draft_model=target_model, draft_model_name="self")


def complete_all(engine: Engine, specs: list[RequestSpec]):
    async def main():
        return await asyncio.gather(*[engine.complete_async(s) for s in specs])

    return run(main())


def test_plain_engine_matches_hf_generate(engine_small, hf_greedy) -> None:
    for prompt in PROMPTS:
        result = engine_small.complete(spec(prompt, "none"))
        assert result.token_ids == hf_greedy[tuple(prompt)]
        assert result.finish_reason == "length"
        assert result.stats.proposed_tokens == 0 and result.stats.steps == NEW_TOKENS


@pytest.mark.parametrize("which, drafter", [("small", "ngram"), ("small", "model:small"), ("self", "model:self")])
def test_greedy_speculation_is_token_identical(which, drafter, engine_small, engine_self, hf_greedy) -> None:
    engine = engine_small if which == "small" else engine_self
    prompts = REPETITIVE if drafter == "ngram" else PROMPTS
    cases = [(prompt, k) for prompt in prompts for k in DRAFT_LENGTHS]
    results = complete_all(engine, [spec(prompt, drafter, k) for prompt, k in cases])
    for (prompt, k), result in zip(cases, results):
        label = f"{drafter} k={k} prompt={prompt[:6]}"
        assert result.token_ids == hf_greedy[tuple(prompt)], label
        assert result.finish_reason == "length", label
        stats = result.stats
        assert stats.generated_tokens == NEW_TOKENS and stats.proposed_tokens > 0, label
        assert stats.accepted_tokens > 0, label  # speculation actually paid off somewhere
        assert stats.steps < NEW_TOKENS, label
        if drafter == "model:small":
            assert stats.acceptance_rate < 1.0, label  # partial acceptance: rejections exercised
        if drafter == "model:self":
            assert stats.acceptance_rate > 0.9, label  # the target agrees with itself
    # Every request released its sessions in both tiers.
    assert len(engine.verifier.worker.sessions) == 0 and len(engine.drafter.worker.sessions) == 0


def test_adaptive_draft_length_keeps_tokens(engine_small, hf_greedy) -> None:
    specs = [spec(p, d, 8, adaptive=True) for p in PROMPTS for d in ("ngram", "model:small")]
    for s, result in zip(specs, complete_all(engine_small, specs)):
        assert result.token_ids == hf_greedy[tuple(s.token_ids)]


def test_concurrent_requests_match_one_at_a_time(target_model, draft_model, tokenizer, hf_greedy) -> None:
    engine = Engine(target_model, tokenizer, drafter="ngram", draft_model=draft_model, draft_model_name="small")
    specs = [
        spec(PROMPTS[0], "ngram", 3),
        spec(PROMPTS[1], "model:small", 5),
        spec(PROMPTS[2], "none"),
        spec(PROMPTS[2], "model:small", 2, temperature=0.8, top_k=20, seed=7),
        spec(PROMPTS[0], "ngram", 6, temperature=1.0, top_p=0.9, seed=8),
        spec(PROMPTS[1], "none", temperature=1.2, seed=9),
    ]
    sequential = [engine.complete(s) for s in specs]
    assert engine.verifier.worker.stats.max_batch_size == 1
    concurrent = complete_all(engine, specs)
    assert engine.verifier.worker.stats.max_batch_size > 1  # the target really batched them
    assert max(r.stats.mean_verify_batch_size for r in concurrent) > 1
    for s, a, b in zip(specs, sequential, concurrent):
        assert a.token_ids == b.token_ids, s
        if s.temperature is None:
            assert a.token_ids == hf_greedy[tuple(s.token_ids)]


def test_lost_sessions_resync_without_changing_output(target_model, draft_model, hf_greedy) -> None:
    """Replicas that keep only one session (as after a restart or eviction) answer
    needs_resync; the loop resends and the output is unchanged."""
    verifier = LocalVerifier(TargetWorker(build_runner(target_model), max_sessions=1))
    drafter = LocalDrafter(DraftWorker(build_runner(draft_model), "small", max_sessions=1))
    requests = [
        GenerationRequest(f"r{i}", list(p), NEW_TOKENS, SamplingParams(), drafter=d, max_draft_tokens=4, adaptive=False)
        for i, (p, d) in enumerate([(PROMPTS[0], "model:small"), (PROMPTS[1], "ngram"), (PROMPTS[2], "model:small")])
    ]

    async def main():
        return await asyncio.gather(*[generate(r, Tiers(verifier, drafter), IdTokenizer(), []) for r in requests])

    for request, result in zip(requests, run(main())):
        assert result.token_ids == hf_greedy[tuple(request.prompt_ids)], request.session_id


def test_hf_runner_speculation_matches(target_model, draft_model, hf_greedy) -> None:
    """The fallback runner (the model's own forward, cropped cache) gives the same tokens."""
    verifier = LocalVerifier(TargetWorker(HFRunner(target_model)))
    drafter = LocalDrafter(DraftWorker(HFRunner(draft_model), "small"))
    for prompt in PROMPTS[1:]:
        request = GenerationRequest(
            "h", list(prompt), NEW_TOKENS, SamplingParams(), drafter="model:small", max_draft_tokens=5, adaptive=False
        )
        result = run(generate(request, Tiers(verifier, drafter), IdTokenizer(), []))
        assert result.token_ids == hf_greedy[tuple(prompt)]
        assert 0 < result.stats.accepted_tokens < result.stats.proposed_tokens


def test_stop_strings_and_stop_tokens(engine_small, hf_greedy) -> None:
    prompt = PROMPTS[2]
    full = hf_greedy[tuple(prompt)]
    text = IdTokenizer().decode(full)
    # A stop string straddling tokens 10 and 11 (the second char of one, first of the next).
    stop = text[21:23]
    assert text.find(stop) == 21, "pick a stop string that occurs first there"
    for drafter in ("none", "ngram", "model:small"):
        result = engine_small.complete(spec(prompt, drafter, 6, stop=[stop]))
        assert result.finish_reason == "stop"
        assert result.text == text[:21]
        assert result.token_ids[:11] == full[:11]
    stop_token = full[15]
    first = full.index(stop_token)
    for drafter in ("none", "model:small"):
        result = engine_small.complete(spec(prompt, drafter, 6, stop_token_ids=[stop_token]))
        assert result.finish_reason == "stop"
        assert result.token_ids == full[: first + 1]
        assert result.text == text[: 2 * (first + 1)]
    result = engine_small.complete(spec(prompt, "model:small", 6, max_new_tokens=7))
    assert (result.token_ids, result.finish_reason) == (full[:7], "length")
    result = engine_small.complete(spec(prompt, "model:small", 6, max_new_tokens=1))
    assert (result.token_ids, result.finish_reason) == (full[:1], "length")


def test_context_limit_same_tokens_as_plain(engine_self, target_model) -> None:
    """Near the model's context limit speculation must stop where plain decoding stops."""
    max_context = target_model.config.max_position_embeddings
    prompt = (PROMPTS[0] * 20)[: max_context - 17]
    plain = engine_self.complete(spec(prompt, "none", max_new_tokens=100))
    assert plain.finish_reason == "context"
    assert len(prompt) + len(plain.token_ids) <= max_context
    for drafter, k in [("model:self", 8), ("model:self", 3), ("ngram", 5)]:
        result = engine_self.complete(spec(prompt, drafter, k, max_new_tokens=100))
        assert result.finish_reason == "context", (drafter, k)
        assert result.token_ids == plain.token_ids, (drafter, k)


@pytest.mark.parametrize("which,drafter", [("small", "model:small"), ("self", "model:self"), ("small", "ngram")])
def test_overlapped_drafting_is_token_identical(which, drafter, engine_small, engine_self, hf_greedy) -> None:
    """Pre-drafting step n+1 during step n's verification changes nothing but speed."""
    engine = engine_small if which == "small" else engine_self
    used = 0
    for k in DRAFT_LENGTHS:
        results = complete_all(engine, [spec(p, drafter, k, overlap=True) for p in PROMPTS])
        for prompt, result in zip(PROMPTS, results):
            assert result.token_ids == hf_greedy[tuple(prompt)], (drafter, k, prompt)
            assert result.stats.predrafts >= result.stats.predrafts_used
            used += result.stats.predrafts_used
    if which == "self":
        assert used > 0, "a draft identical to the target must have its pre-drafts used"


def test_overlapped_drafting_keeps_sampled_tokens(engine_small) -> None:
    """Same seed, overlap on or off: the pre-draft draws the same tokens at the same
    positions from the same context, so even sampled output is identical."""
    base = dict(max_new_tokens=30, temperature=0.8, top_p=0.95, seed=7)
    for prompt in PROMPTS:
        off, on = complete_all(
            engine_small,
            [
                spec(prompt, "model:small", 4, overlap=False, **base),
                spec(prompt, "model:small", 4, overlap=True, **base),
            ],
        )
        assert on.token_ids == off.token_ids


def test_a_cache_budget_evicts_idle_sessions_without_changing_output(target_model, draft_model, hf_greedy) -> None:
    """A budget of 70 cached tokens holds about one session of these: the others are evicted
    (least recently used, never one in the running batch) and recomputed when they return."""
    target = TargetWorker(build_runner(target_model), max_cached_tokens=70)
    draft = DraftWorker(build_runner(draft_model), "small", max_cached_tokens=70)
    requests = [
        GenerationRequest(f"b{i}", list(p), NEW_TOKENS, SamplingParams(), drafter=d, max_draft_tokens=4, adaptive=False)
        for i, (p, d) in enumerate(
            [(PROMPTS[0], "model:small"), (PROMPTS[1], "ngram"), (PROMPTS[2], "model:small"), (PROMPTS[0], "ngram")]
        )
    ]
    resyncs, idle_held = [0], [0]
    verify_batch = target.verify_batch

    def watched(items):
        verdicts = verify_batch(items)
        resyncs[0] += sum(getattr(v, "needs_resync", False) for v in verdicts)
        batch = {item.session_id for item in items}
        idle = sum(len(s.tokens) for sid, s in target.sessions.least_recent_first() if sid not in batch)
        idle_held[0] = max(idle_held[0], idle)
        return verdicts

    verifier, drafter = LocalVerifier(target), LocalDrafter(draft)
    verifier.batcher._run_batch = watched

    async def main():
        return await asyncio.gather(*[generate(r, Tiers(verifier, drafter), IdTokenizer(), []) for r in requests])

    for request, result in zip(requests, run(main())):
        assert result.token_ids == hf_greedy[tuple(request.prompt_ids)], request.session_id
    assert resyncs[0] > 0  # sessions were evicted and came back
    assert 0 < idle_held[0] <= 70  # idle sessions never held more than the budget
