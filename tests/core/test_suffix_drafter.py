"""The suffix drafter: its index against a brute-force reference (longest match, most
frequent continuation, rollback), the shared stream across sessions and its bound, state
freed on release; and greedy output identical to plain decoding through the engine."""

from __future__ import annotations

import asyncio
import gc
import random
from typing import Any

import pytest
import torch
from tiny_models import IdTokenizer, run
from transformers import LlamaForCausalLM

from specdec.core.drafters.base import DraftSession
from specdec.core.drafters.registry import DRAFTERS, parse_drafter
from specdec.core.drafters.suffix import SEPARATOR, SuffixChainDrafter, SuffixDrafter, SuffixIndex
from specdec.core.drafters.worker import DraftWorker
from specdec.core.engine import Engine
from specdec.core.generation import GenerationResult
from specdec.core.request import RequestSpec
from specdec.core.sampling import SamplingParams
from specdec.core.types import Proposal, ProposeItem

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0, seed=3)
EVERYTHING = 1 << 30  # max_candidates: every occurrence, as the reference sees them


def item(k: int, sampling: SamplingParams = GREEDY) -> ProposeItem:
    return ProposeItem("s", 0, [], k, sampling, "suffix")


def session_with(drafter: SuffixDrafter, tokens: list[int]) -> DraftSession:
    session = DraftSession(list(tokens))
    drafter.learn(session, list(tokens))
    return session


def reference_match(stream: list[int], context: list[int], max_match: int, own: bool) -> tuple[int, list[int]]:
    """Brute force: the longest common suffix of `context` and stream[:end + 1] over every
    end (but the context's own), and the ends reaching it, newest first."""
    lengths = {}
    for end in range(len(stream) - 1 if own else len(stream)):
        length = 0
        while length < min(max_match, len(context)) and end - length >= 0:
            if stream[end - length] != context[-1 - length] or stream[end - length] == SEPARATOR:
                break
            length += 1
        lengths[end] = length
    best = max(lengths.values(), default=0)
    return (best, sorted((e for e, n in lengths.items() if n == best), reverse=True)) if best else (0, [])


def reference_follow(stream: list[int], ends: list[int], max_tokens: int, min_prob: float) -> list[int]:
    draft: list[int] = []
    prob = 1.0
    for step in range(1, max_tokens + 1):
        nexts = [stream[e + step] for e in ends if e + step < len(stream) and stream[e + step] != SEPARATOR]
        if not nexts:
            break
        top = max(nexts.count(t) for t in nexts)
        best = next(t for t in nexts if nexts.count(t) == top)  # the newest of the most frequent
        prob *= top / len(nexts)
        if prob < min_prob:
            break
        draft.append(best)
        ends = [e for e in ends if e + step < len(stream) and stream[e + step] == best]
    return draft


def test_registered_and_parsed() -> None:
    assert DRAFTERS["suffix"] is SuffixDrafter
    assert parse_drafter("suffix").kind == "suffix" and not parse_drafter("suffix").needs_model


def test_longest_match_wins_over_a_more_recent_shorter_one() -> None:
    drafter = SuffixChainDrafter()
    # "1 2 3" is followed by 40 41; later "9 2 3" (a shorter match of "... 1 2 3") by 50 51.
    session = session_with(drafter, [1, 2, 3, 40, 41, 7, 9, 2, 3, 50, 51, 8, 1, 2, 3])
    assert drafter.draft(session, item(2)).tokens == [40, 41]
    session = session_with(drafter, [1, 2, 3, 40, 41, 7, 9, 2, 3, 50, 51, 8, 5, 2, 3])
    assert drafter.draft(session, item(2)).tokens == [50, 51]  # a tie in length: the newest


def test_the_most_frequent_continuation_is_proposed() -> None:
    drafter = SuffixChainDrafter(min_prob=0.0)
    ctx = [10, 11, 12]
    tokens = ctx + [1, 2] + [90] + ctx + [1, 2] + [91] + ctx + [7, 8] + [92] + ctx  # each a 3-token match
    assert drafter.draft(session_with(drafter, tokens), item(2)).tokens == [1, 2]  # 2 of 3, though 7 8 is newest


def test_draft_length_follows_confidence_match_length_and_k() -> None:
    ctx = [10, 11, 12, 13]
    tokens = ctx + [1, 2, 3] + [90] + ctx + [1, 2, 4] + [91] + ctx + [1, 5, 6] + [92] + ctx
    # Continuation frequencies 3/3, 2/3, then 1/2 (3 or 4, a tie: the newest): products 1, 2/3, 1/3.
    for min_prob, expected in [(0.9, [1]), (0.5, [1, 2]), (0.3, [1, 2, 4])]:
        drafter = SuffixChainDrafter(min_prob=min_prob)
        assert drafter.draft(session_with(drafter, tokens), item(3)).tokens == expected
    drafter = SuffixChainDrafter(min_prob=0.0)
    assert drafter.draft(session_with(drafter, tokens), item(2)).tokens == [1, 2]  # k caps it
    assert drafter.draft(session_with(drafter, tokens), item(0)).tokens == []
    # spec_factor 2: a one-token match proposes two tokens, a three-token match up to six.
    short = [5, 6, 7, 8, 9] + [0, 5]
    assert drafter.draft(session_with(drafter, short), item(8)).tokens == [6, 7]
    long = [1, 2, 3, 4, 5, 6, 7, 8, 9] + [0, 2, 3, 4]
    assert drafter.draft(session_with(drafter, long), item(8)).tokens == [5, 6, 7, 8, 9, 0]
    assert SuffixChainDrafter(spec_factor=1.0).draft(session_with(drafter, long), item(8)).tokens == [5, 6, 7]
    assert drafter.draft(session_with(drafter, [1, 2, 3, 4]), item(8)).tokens == []  # nothing matches


@pytest.mark.parametrize("seed", range(6))
def test_index_matches_brute_force_through_appends_and_rollbacks(seed: int) -> None:
    rng = random.Random(seed)
    index, stream = SuffixIndex(), list[int]()
    for _ in range(60):
        if stream and rng.random() < 0.3:  # a rollback: drafts assumed accepted that were not
            cut = rng.randrange(len(stream))
            index.truncate(cut)
            del stream[cut:]
        new = [rng.randrange(4) for _ in range(rng.randrange(1, 8))]
        index.extend(new)
        stream += new
        assert index.length == len(stream) and [index.token_at(p) for p in range(len(stream))] == stream
        got = index.match(stream, 12, EVERYTHING, exclude=len(stream) - 1)
        assert got == reference_match(stream, stream, 12, own=True)
        if got[1]:
            assert index.follow(got[1], 6, 0.2)[0] == reference_follow(stream, got[1], 6, 0.2)
    fresh = SuffixIndex()
    fresh.extend(stream)
    assert fresh._heads == index._heads  # nothing of the dropped tokens is left behind


@pytest.mark.parametrize("seed", range(3))
def test_ring_matches_brute_force_over_what_it_holds(seed: int) -> None:
    rng = random.Random(seed)
    ring, stream = SuffixIndex(capacity=50), list[int]()
    for _ in range(40):
        sequence = [SEPARATOR] + [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
        ring.extend(sequence)
        stream += sequence
        held = stream[-50:]
        assert len(ring) == len(held) and ring.start == len(stream) - len(held)
        context = [rng.randrange(4) for _ in range(10)]
        length, ends = ring.match(context, 12, EVERYTHING)
        ref_length, ref_ends = reference_match(held, context, 12, own=False)
        assert (length, [e - ring.start for e in ends]) == (ref_length, ref_ends)
        if ends:
            assert ring.follow(ends, 6, 0.2)[0] == reference_follow(held, ref_ends, 6, 0.2)
    # Bounded: no key outlives every position it was seen at.
    assert all(ring.start <= end < ring.length for heads in ring._heads for end in heads.values())
    assert sum(len(heads) for heads in ring._heads) <= 50 * 3


def test_the_shared_stream_drafts_greedy_requests_of_other_sessions() -> None:
    drafter = SuffixChainDrafter()
    prompt, output = [5, 6, 7, 8], [20, 21, 22, 23, 24, 25]
    first = session_with(drafter, prompt)
    assert drafter.draft(first, item(4)).tokens == []
    first.tokens += output
    drafter.learn(first, output)
    drafter.release(first)
    second = session_with(drafter, prompt)
    assert drafter.draft(second, item(4)).tokens == [20, 21, 22, 23]  # the first session's output
    # A sampled request drafts from its own tokens only: its seeded output cannot depend
    # on what other requests ran before it.
    assert drafter.draft(second, item(4, SAMPLED)).tokens == []
    # Its own stream wins when it scores higher.
    second.tokens += [20, 30, 31, 32, 33, 5, 6, 7, 8, 20]
    drafter.learn(second, second.tokens[4:])
    assert drafter.draft(second, item(4)).tokens == [30, 31, 32, 33]
    drafter.forget()  # the shared stream is emptied: a new session with the prompt drafts nothing
    assert drafter.draft(session_with(drafter, prompt), item(4)).tokens == []


def test_shared_stream_forgets_the_oldest_outputs() -> None:
    drafter = SuffixChainDrafter(shared_tokens=64, max_match=4)
    for i in range(20):
        session = session_with(drafter, [1, 2, 3, 4])
        output = [100 + i] * 10
        session.tokens += output
        drafter.learn(session, output)
        drafter.release(session)
        assert len(drafter.shared) <= 64
    probe = session_with(drafter, [1, 2, 3, 4])
    assert drafter.draft(probe, item(1)).tokens == [119]  # the newest output; the first ones are gone
    for i in range(15):
        assert drafter.draft(session_with(drafter, [100 + i]), item(1)).tokens == []
    assert drafter.draft(session_with(drafter, [116]), item(1)).tokens == [116]


def test_release_and_eviction_free_the_session_state() -> None:
    drafter = SuffixChainDrafter()
    kept = session_with(drafter, [1, 2, 3])
    dropped = session_with(drafter, [4, 5, 6])
    assert drafter.num_sessions == 2
    drafter.release(kept)
    assert drafter.num_sessions == 1
    del dropped  # a session the worker evicts without a release
    gc.collect()
    assert drafter.num_sessions == 0
    drafter.release(kept)  # a second release is harmless


def test_worker_rollbacks_keep_the_index_in_step() -> None:
    """Through the draft worker: a pre-draft's assumed tokens, then a delta from before them."""
    worker = DraftWorker()
    suffix = worker.methods["suffix"]
    assert isinstance(suffix, SuffixDrafter)
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]

    def propose(prefix_len: int, tokens: list[int]) -> Proposal:
        (proposal,) = worker.propose_batch([ProposeItem("a", prefix_len, tokens, 3, GREEDY, "suffix")])
        assert isinstance(proposal, Proposal)
        return proposal

    assert propose(0, prompt).tokens == [5, 6, 3]
    propose(len(prompt), [5, 6, 3, 9])  # a pre-draft assumes every draft is accepted
    committed = [5, 7]  # but the target kept one draft, then its own token
    proposal = propose(len(prompt), committed)
    tokens = prompt + committed
    fresh = SuffixChainDrafter()
    assert proposal.tokens == fresh.draft(session_with(fresh, tokens), item(3)).tokens
    (state,) = suffix._states.values()
    assert [state.own.token_at(p) for p in range(state.own.length)] == tokens
    assert proposal.probs is None  # one-hot: a deterministic draft
    worker.release("a")
    assert suffix.num_sessions == 0 and len(suffix.shared) > 0


def test_lookup_cost_does_not_grow_with_the_context() -> None:
    """Counted, not timed: a lookup at 4k tokens of repetitive context visits at most
    max_candidates chain links and max_match tokens for each."""
    drafter = SuffixChainDrafter(max_candidates=8, max_match=16)
    session = session_with(drafter, [7] * 4096)
    reads = 0
    own = drafter._states[id(session)].own
    original = own.token_at

    def counting(position: int) -> int:
        nonlocal reads
        reads += 1
        return original(position)

    own.token_at = counting  # type: ignore[method-assign]
    assert drafter.draft(session, item(5)).tokens == [7] * 5
    assert reads <= 8 * 16 + 5 * 8 * 2


# Through the engine, with the tiny models.

NEW_TOKENS = 40
REPETITIVE = [[215, 20, 132, 248, 207, 155] * 3, [183, 111, 71, 144, 71, 48] * 3]
PROMPTS = REPETITIVE + [[9, 200, 31, 77, 4, 250, 18]]
Outputs = dict[tuple[int, ...], list[int]]  # prompt -> plain greedy output


def spec(prompt: list[int], k: int = 4, **kw: Any) -> RequestSpec:
    return RequestSpec(
        token_ids=list(prompt),
        max_new_tokens=kw.pop("max_new_tokens", NEW_TOKENS),
        ignore_eos=True,
        drafter=kw.pop("drafter", "suffix"),
        max_draft_tokens=k,
        adaptive=kw.pop("adaptive", False),
        **kw,
    )


@pytest.fixture(scope="module")
def engine(target_model: Any, tokenizer: IdTokenizer) -> Engine:
    return Engine(target_model, tokenizer, drafter="suffix")


@pytest.fixture(scope="module")
def plain(target_model: LlamaForCausalLM) -> Outputs:
    out = {}
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            gen = target_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
            )
            out[tuple(prompt)] = gen[0, len(prompt) :].tolist()
    return out


def complete_all(engine: Engine, specs: list[RequestSpec]) -> list[GenerationResult]:
    async def main() -> list[GenerationResult]:
        return await asyncio.gather(*[engine.complete_async(s) for s in specs])

    results: list[GenerationResult] = run(main())
    return results


def test_greedy_output_identical_at_every_draft_length(engine: Engine, plain: Outputs) -> None:
    cases = [(prompt, k, overlap) for prompt in PROMPTS for k in range(1, 9) for overlap in (False, True)]
    results = complete_all(engine, [spec(prompt, k, overlap=overlap) for prompt, k, overlap in cases])
    for (prompt, k, overlap), result in zip(cases, results):
        assert result.token_ids == plain[tuple(prompt)], (k, overlap, prompt[:6])
        assert result.stats.steps < NEW_TOKENS or prompt not in REPETITIVE, (k, overlap, prompt[:6])
    assert sum(r.stats.proposed_tokens for r in results) > sum(r.stats.accepted_tokens for r in results) > 0
    suffix = engine.drafter.worker.methods["suffix"]
    assert isinstance(suffix, SuffixDrafter) and suffix.num_sessions == 0


def test_a_repeated_request_drafts_from_the_first_ones_output(
    target_model: Any, tokenizer: IdTokenizer, plain: Outputs
) -> None:
    engine = Engine(target_model, tokenizer, drafter="suffix")  # an empty shared stream
    prompt = PROMPTS[2]  # not repetitive: its own tokens give little to draft from
    first = engine.complete(spec(prompt, 8))
    again = engine.complete(spec(prompt, 8))
    assert first.token_ids == again.token_ids == plain[tuple(prompt)]
    assert again.stats.accepted_tokens > max(first.stats.accepted_tokens, NEW_TOKENS // 2)
    assert again.stats.steps < first.stats.steps


def test_sampled_output_with_a_seed_is_reproducible_whatever_ran_before(engine: Engine) -> None:
    sampled = [spec(p, 4, temperature=0.9, top_p=0.95, seed=s) for p in PROMPTS for s in (1, 2)]
    before = [r.token_ids for r in complete_all(engine, sampled)]
    complete_all(engine, [spec(p, 4) for p in PROMPTS] + sampled)  # the shared stream learns their outputs
    assert [r.token_ids for r in complete_all(engine, sampled)] == before


def test_a_greedy_request_gets_a_tree_of_the_most_probable_continuations() -> None:
    drafter = SuffixDrafter(min_prob=0.0)
    # After "1 2": 3 twice (then 9, then 8), 4 once (then 9).
    session = session_with(drafter, [1, 2, 3, 9, 1, 2, 4, 9, 1, 2, 3, 8, 1, 2])
    tree = drafter.draft(session, item(4))
    assert (tree.tokens, tree.parents) == ([3, 4, 8, 9], [-1, -1, 0, 0])  # among equals the newest first
    assert tree.score == pytest.approx(2 / 3 + 3 * (1 / 3))
    (proposal,) = drafter.propose([(session, item(4))])
    assert proposal.tokens == [3, 4, 8, 9] and proposal.parents == [-1, -1, 0, 0]
    # The draft length is the node budget; depth still follows the match length.
    assert drafter.draft(session, item(1)).tokens == [3]
    assert SuffixDrafter(min_prob=0.4).draft(session, item(4)).tokens == [3]  # 1/3 branches fall below
    # Sampled requests get a tree too; penalised ones and the chain variant the most frequent path.
    assert drafter.draft(session, item(4, SAMPLED)).parents == [-1, -1, 0, 0]
    penalised = drafter.draft(session, item(4, SamplingParams(repetition_penalty=1.2)))
    assert (penalised.tokens, penalised.parents) == ([3, 8, 1, 2], [-1, 0, 1, 2])
    (chain,) = SuffixChainDrafter(min_prob=0.0).propose([(session_with(drafter, session.tokens), item(4))])
    assert chain.tokens == [3, 8, 1, 2] and chain.parents is None
