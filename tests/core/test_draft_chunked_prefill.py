"""Chunked prefill at the draft tier: the model drafter advances a long prompt by a chunk
a pass (answering NOT_YET until it is done) beside other sessions' draft steps, and its
proposals are those of a drafter that prefills in one pass: greedy tokens and sampled
tokens identical, their probabilities (q) to float rounding."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from test_core_chunked_prefill import Passes
from tiny_models import IdTokenizer, run

from specdec.core.attention import GROUP_MAX_ROWS
from specdec.core.batcher import NOT_YET, MicroBatcher
from specdec.core.cost import MIN_PREFILL_CHUNK
from specdec.core.drafters.model import ModelDrafter
from specdec.core.drafters.worker import DraftWorker
from specdec.core.generation import generate
from specdec.core.interfaces import Tiers
from specdec.core.local import LocalDrafter, LocalVerifier
from specdec.core.loop import GenerationRequest
from specdec.core.runner import build_runner
from specdec.core.sampling import SamplingParams
from specdec.core.target import TargetWorker
from specdec.core.types import Proposal, ProposeItem

LONG = [(5 * i * i + 7 * i + 3) % 256 for i in range(150)]
SHORT = [215, 20, 132, 248, 207, 155, 9, 200]
K = 4


def chunk_sizes(passes: Passes) -> list[int]:
    return [n for items in passes.log for n, logits in items if logits == 0]


def worker(draft_model, **chunking) -> tuple[DraftWorker, Passes]:
    runner = build_runner(draft_model)
    passes = Passes(runner)
    return DraftWorker(runner, "small", **chunking), passes


def item(session: str, tokens: list[int], prefix_len: int = 0, **sampling) -> ProposeItem:
    return ProposeItem(session, prefix_len, tokens, K, SamplingParams(**sampling), "model:small")


def until_proposed(w: DraftWorker, items: list[ProposeItem]) -> tuple[list[Proposal], list[int]]:
    """Run batches as the batcher does (NOT_YET items again, first in line) until every item
    has its proposal; also how many batches answered each item NOT_YET."""
    done: dict[int, Proposal] = {}
    waits = [0] * len(items)
    while len(done) < len(items):
        pending = [i for i in range(len(items)) if i not in done]
        for i, result in zip(pending, w.propose_batch([items[i] for i in pending])):
            if result is NOT_YET:
                waits[i] += 1
            else:
                assert isinstance(result, Proposal)
                done[i] = result
    return [done[i] for i in range(len(items))], waits


def expected_chunks(prompt_rows: int, chunk: int) -> int:
    """Chunks of `chunk` rows until what is left is step-sized (GROUP_MAX_ROWS rows at
    most), which runs whole with the logits."""
    return -(-(prompt_rows - GROUP_MAX_ROWS) // chunk)


@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.9, top_p=0.95, seed=3)])
def test_chunked_proposals_equal_one_pass_prefill(draft_model, sampling) -> None:
    chunked, passes = worker(draft_model, prefill_chunk_tokens=7)
    whole, whole_passes = worker(draft_model, prefill_chunk_s=0.0)
    steps = [item("long", LONG, **sampling)]
    for w in (chunked, whole):
        (first,), _ = until_proposed(w, steps)
        # The next step: the first draft token accepted, then the drafter's own (as the target commits).
        nxt = [item("long", [first.tokens[0], 17], prefix_len=len(LONG), **sampling)]
        (second,), waits = until_proposed(w, nxt)
        assert waits == [0]  # a step never waits
        w.results = [first, second]  # type: ignore[attr-defined]
    for got, want in zip(chunked.results, whole.results):  # type: ignore[attr-defined]
        assert got.tokens == want.tokens and len(got.tokens) == K
        if sampling:
            # Equal to float rounding: a chunked prompt's rows sum in another order, as rows of
            # batches of other sizes do (exactness holds with any q the drafts were drawn from).
            assert got.probs is not None and want.probs is not None
            assert torch.allclose(got.probs, want.probs, rtol=2e-3, atol=1e-6)
        else:
            assert got.probs is None and want.probs is None
    assert chunk_sizes(passes) == [7] * expected_chunks(len(LONG) - 1, 7)
    assert chunk_sizes(whole_passes) == [] and whole_passes.log[0] == [(len(LONG), 1)]


def test_short_streams_draft_while_a_long_prompt_prefills(draft_model) -> None:
    """Each batch drafts the short session whole while the long prompt advances one chunk."""
    w, passes = worker(draft_model, prefill_chunk_tokens=7)
    long, short_item, batches = item("long", LONG), item("short", SHORT), 0
    while True:
        short, result = w.propose_batch([short_item, long])
        short_item = item("short", [17], prefix_len=len(SHORT) + batches)
        batches += 1
        assert isinstance(short, Proposal) and len(short.tokens) == K
        if result is not NOT_YET:
            assert isinstance(result, Proposal) and len(result.tokens) == K
            break
    assert batches == expected_chunks(len(LONG) - 1, 7) + 1
    with_chunk = [p for p in passes.log if any(n == 0 for _, n in p)]
    assert len(with_chunk) == batches - 1
    assert all(sorted(p) == [(1, 1), (7, 0)] or sorted(p) == [(7, 0), (len(SHORT), 1)] for p in with_chunk)


def test_time_budget_chunks_follow_the_cost_model(draft_model) -> None:
    """A budget below any chunk's cost: every chunk is the minimum, and the drafter learns
    the prefill cost from them (not its per-row draft cost)."""
    chunked, passes = worker(draft_model, prefill_chunk_s=1e-9)
    whole, _ = worker(draft_model, prefill_chunk_s=0.0)
    (got,), waits = until_proposed(chunked, [item("long", LONG)])
    (want,), _ = until_proposed(whole, [item("long", LONG)])
    assert got.tokens == want.tokens
    sizes = chunk_sizes(passes)
    assert sizes[0] == 64 and set(sizes[1:]) == {MIN_PREFILL_CHUNK}  # 64: before any chunk was measured
    assert waits == [len(sizes)]
    model = chunked.methods["model:small"]
    assert isinstance(model, ModelDrafter)
    assert model.prefill_cost.chunks == len(sizes) and model.prefill_cost.token_s > 0


def request(session: str, prompt: list[int], **sampling) -> GenerationRequest:
    params = SamplingParams(**sampling)
    return GenerationRequest(session, list(prompt), 20, params, "model:small", max_draft_tokens=K, adaptive=False)


@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.9, seed=5)])
def test_loop_output_unchanged_by_draft_chunking(target_model, draft_model, sampling) -> None:
    """Through the loop and the batcher: the same tokens and the same acceptance with the
    drafter prefilling in chunks of 7 as in one pass (the target prefills in one pass)."""
    outputs = []
    for chunking in (dict(prefill_chunk_s=0.0), dict(prefill_chunk_tokens=7)):
        draft, passes = worker(draft_model, **chunking)
        tiers = Tiers(LocalVerifier(TargetWorker(build_runner(target_model), prefill_chunk_s=0)), LocalDrafter(draft))
        reqs = [request("long", LONG, **sampling), request("short", SHORT, **sampling)]

        async def main(tiers: Tiers = tiers, reqs: list[GenerationRequest] = reqs):
            return await asyncio.gather(*[generate(r, tiers, IdTokenizer(), []) for r in reqs])

        results = run(main())
        outputs.append([(r.token_ids, r.stats.accepted_tokens) for r in results])
        assert (len(chunk_sizes(passes)) > 0) == ("prefill_chunk_tokens" in chunking)
    assert outputs[0] == outputs[1]


def test_paired_verifier_does_not_wait_for_a_prefilling_draft_item() -> None:
    """The embedded engine pairs the drafter's batcher with the verifier's, which waits for
    the drafter's queued sessions to come over; an item the drafter runs again (a prompt
    prefilling in chunks) does not come over, and must not hold the verifier's steps."""

    async def main() -> float:
        runs = 0

        def draft(items: list[str]) -> list[str | object]:
            nonlocal runs
            out: list[str | object] = []
            for it in items:
                if it == "long" and runs < 150:  # 150 passes of 10 ms
                    runs += 1
                    time.sleep(0.01)
                    out.append(NOT_YET)
                else:
                    out.append(it)
            return out

        drafter, verifier = MicroBatcher(draft), MicroBatcher(lambda items: list(items))
        verifier.share_compute_with(drafter)
        long = asyncio.ensure_future(drafter.submit("long"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        assert await verifier.submit("short") == "short"
        waited = time.monotonic() - started
        assert await long == "long"
        return waited

    assert run(main()) < 0.5  # not the whole 1.5 s prefill (nor the 2 s liveness bound)
