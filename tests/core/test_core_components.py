"""n-gram proposer, incremental detokenizer, request validation, micro-batcher."""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time

import pytest
from tiny_models import run

from specdec.core.adaptive import DraftLength, StepCosts
from specdec.core.batcher import MicroBatcher
from specdec.core.cost import PassCost
from specdec.core.detokenize import IncrementalDetokenizer
from specdec.core.drafters.ngram import ngram_propose
from specdec.core.drafters.registry import parse_drafter
from specdec.core.errors import InvalidArgument
from specdec.core.request import MAX_DRAFT_TOKENS, ModelLimits, RequestSpec, build_request
from tests.waiting import until

# ---------------------------------------------------------------- n-gram proposer


def test_ngram_edge_cases() -> None:
    assert ngram_propose([1, 2, 1, 2], 0) == []
    assert ngram_propose([1, 2, 1, 2], -3) == []
    assert ngram_propose([], 4) == []
    assert ngram_propose([7], 4) == []
    assert ngram_propose([1, 2, 3, 4, 5], 3) == []  # nothing repeats
    assert ngram_propose([1, 2, 3, 1, 2], 3) == [3, 1, 2]
    assert ngram_propose([1, 2, 3, 1, 2], 1) == [3]  # at most k
    # The longest matching n-gram wins over a more recent shorter one.
    tokens = [7, 1, 2, 9, 1, 3, 7, 1]
    assert ngram_propose(tokens, 3) == [2, 9, 1]
    assert ngram_propose(tokens, 3, max_ngram=1) == [3, 7, 1]
    # Among equal lengths, the most recent earlier occurrence wins.
    assert ngram_propose([1, 2, 1, 3, 1], 2) == [3, 1]
    # The continuation stops at the end of the sequence (never proposes past it).
    assert ngram_propose([4, 4, 4], 5) == [4]
    assert ngram_propose([5, 6, 5], 4) == [6, 5]
    # min_ngram: a single-token match is not enough.
    assert ngram_propose([1, 2, 3, 1], 2, min_ngram=2) == []
    assert ngram_propose([1, 2, 3, 1], 2) == [2, 3]


def test_parse_drafter_and_draft_length() -> None:
    assert parse_drafter("none") == ("none", "")
    assert parse_drafter("ngram") == ("ngram", "")
    assert parse_drafter("model:small") == ("model", "small")
    for bad in ("model:", "model", "eagle", ""):
        with pytest.raises(InvalidArgument) as err:
            parse_drafter(bad)
        assert err.value.field == "speculation.drafter"
    fixed = DraftLength(3, adaptive=False)
    fixed.update(3, 0, StepCosts(draft_pass_base_s=1.0, pass_base_s=0.01, row_s=0.01, batch_size=8))
    assert fixed.k == 3


def _steer(
    k: DraftLength,
    accept_rate: float,
    base_s: float,
    token_s: float,
    steps: int = 60,
    batch: int = 1,
    row_s: float = 0.0,
) -> None:
    """Feed the controller steps with these costs reported by the tiers."""
    for _ in range(steps):
        proposed = k.k
        k.update(
            proposed,
            round(proposed * accept_rate),
            StepCosts(draft_pass_base_s=token_s, pass_base_s=base_s, row_s=row_s, batch_size=batch),
        )


def test_draft_length_grows_when_drafts_pay() -> None:
    k = DraftLength(8, adaptive=True)
    _steer(k, accept_rate=1.0, base_s=0.06, token_s=0.004)
    assert k.first > 0.95 and k.follow > 0.95 and k.k >= 6


def test_draft_length_falls_back_to_plain_when_drafts_do_not_pay() -> None:
    k = DraftLength(8, adaptive=True)
    _steer(k, accept_rate=0.0, base_s=0.06, token_s=0.02)
    assert k.first < 0.15
    plain_steps = 0
    for _ in range(32):
        plain_steps += k.k == 0
        _steer(k, accept_rate=0.0, base_s=0.06, token_s=0.02, steps=1)
    assert plain_steps >= 28, "mostly plain decoding, with rare probes"


def test_a_model_free_drafter_keeps_a_cheap_floor_but_not_under_load() -> None:
    """Nothing is ever accepted: the controller alone would stop drafting; with the floor a
    model-free drafter (it drafts only on a match) keeps the drafts that cost <= 10% of a
    step at c=1, and none once the batch's rows price them out."""
    free = DraftLength(12, adaptive=True, floor=True)
    _steer(free, accept_rate=0.0, base_s=0.0225, token_s=0.0, row_s=0.0013)
    assert free.k == 1  # 22.5 + 1.3 * 2 ms <= 1.1 x (22.5 + 1.3 ms); a second draft is not
    loaded = DraftLength(12, adaptive=True, floor=True)
    _steer(loaded, accept_rate=0.0, base_s=0.0225, token_s=0.0, row_s=0.0013, batch=16)
    assert loaded.k == 0
    cheap = DraftLength(12, adaptive=True, floor=True)
    _steer(cheap, accept_rate=0.0, base_s=0.0225, token_s=0.0, row_s=0.0002)
    assert cheap.k >= 8  # rows nearly free (an accelerator's): the floor is most of the cap
    model = DraftLength(12, adaptive=True)
    _steer(model, accept_rate=0.0, base_s=0.0225, token_s=0.0, row_s=0.0013)
    assert model.k == 0


def test_draft_length_shrinks_when_verification_gets_expensive() -> None:
    """Same acceptance, costlier tokens (a saturated target): shorter drafts."""
    cheap, dear = DraftLength(8, adaptive=True), DraftLength(8, adaptive=True)
    _steer(cheap, accept_rate=0.6, base_s=0.06, token_s=0.003)
    _steer(dear, accept_rate=0.6, base_s=0.06, token_s=0.05)
    assert dear.k < cheap.k


# ---------------------------------------------------------------- detokenizer


class ByteTokenizer:
    """Test stub: token id = one UTF-8 byte, so multi-byte characters span tokens and
    their prefixes decode to U+FFFD, as with real byte-level BPE tokenizers."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def ids(text: str) -> list[int]:
    return list(text.encode())


def test_detokenizer_without_stops_releases_everything_but_partial_characters() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [])
    deltas = [detok.add(ids("ab")).text]
    e_acute = ids("é")
    deltas.append(detok.add(e_acute[:1]).text)  # half a character: held back
    assert deltas[-1] == ""
    deltas.append(detok.add(e_acute[1:] + ids("c")).text)
    assert deltas == ["ab", "", "éc"]
    assert detok.text == "abéc"


def test_detokenizer_stop_string_across_tokens() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), ["END"])
    released = ""
    for chunk in ("ab", "cE", "N"):
        delta = detok.add(ids(chunk))
        assert not delta.stopped
        released += delta.text
        assert "E" not in released  # a possible start of the stop string is held back
    delta = detok.add(ids("Dxyz"))
    assert delta.stopped
    released += delta.text
    assert released == detok.text == "abc"


def test_detokenizer_holds_back_then_releases_on_final() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), ["STOP"])
    delta = detok.add(ids("hello ST"))
    assert not delta.stopped and delta.text in ("hello", "hello ")  # "ST" could start STOP
    delta2 = detok.add(ids("ar"), final=True)
    assert not delta2.stopped
    assert delta.text + delta2.text == detok.text == "hello STar"


def test_detokenizer_earliest_stop_string_wins() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), ["world", "hello"])
    delta = detok.add(ids("say hello world"))
    assert delta.stopped
    assert detok.text == "say "


def test_detokenizer_stop_in_first_chunk_and_empty_stops_ignored() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), ["", "\n\n"])
    delta = detok.add(ids("one\n\ntwo"))
    assert delta.stopped and delta.text == "one"
    detok = IncrementalDetokenizer(ByteTokenizer(), [""])
    assert detok.add(ids("x")).text == "x"


# ---------------------------------------------------------------- request validation


class StubTokenizer:
    """Test stub: byte-level encode, EOS id 0, no chat template."""

    eos_token_id = 0
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())


LIMITS = ModelLimits(vocab_size=256, max_context=64, max_new_tokens=1000)
AVAILABLE = ["ngram", "model:small"]


def build(**kw):
    kw.setdefault("token_ids", [1, 2, 3])
    return build_request(RequestSpec(**kw), StubTokenizer(), LIMITS, "ngram", AVAILABLE)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(token_ids=None, prompt=""), "prompt"),
        (dict(token_ids=None, prompt="   "), "prompt"),
        (dict(token_ids=[]), "token_ids.ids"),
        (dict(token_ids=None), "input"),
        (dict(prompt="hi"), "input"),  # two inputs
        (dict(max_new_tokens=0), "decoding.max_new_tokens"),
        (dict(max_new_tokens=-5), "decoding.max_new_tokens"),
        (dict(max_new_tokens=10**9), "decoding.max_new_tokens"),
        (dict(temperature=-0.1), "decoding.temperature"),
        (dict(temperature=math.nan), "decoding.temperature"),
        (dict(temperature=math.inf), "decoding.temperature"),
        (dict(top_p=0.0), "decoding.top_p"),
        (dict(top_p=1.5), "decoding.top_p"),
        (dict(top_k=-1), "decoding.top_k"),
        (dict(seed=-1), "decoding.seed"),
        (dict(drafter="bogus"), "speculation.drafter"),
        (dict(drafter="model:"), "speculation.drafter"),
        (dict(drafter="model:other"), "speculation.drafter"),  # well-formed, not served here
        (dict(max_draft_tokens=0), "speculation.max_draft_tokens"),
        (dict(max_draft_tokens=MAX_DRAFT_TOKENS + 1), "speculation.max_draft_tokens"),
        (dict(token_ids=list(range(64))), "token_ids.ids"),  # no room left in the context
        (dict(token_ids=None, prompt="x" * 100), "prompt"),
        (dict(token_ids=[1, 256]), "token_ids.ids"),
        (dict(token_ids=[-1, 2]), "token_ids.ids"),
        (dict(stop_token_ids=[300]), "decoding.stop_token_ids"),
        (dict(stop=["ok", ""]), "decoding.stop"),
        (dict(stop=[str(i) for i in range(17)]), "decoding.stop"),
        (dict(token_ids=None, messages=[]), "chat.messages"),
        (dict(token_ids=None, messages=[{"role": "robot", "content": "hi"}]), "chat.messages[0].role"),
        (dict(token_ids=None, messages=[{"role": "user", "content": "hi"}]), "chat"),  # no template
    ],
)
def test_request_validation_names_the_field(kwargs, field) -> None:
    with pytest.raises(InvalidArgument) as err:
        build(**kwargs)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)


def test_valid_request_is_built() -> None:
    request, stops = build(
        token_ids=[5, 6],
        max_new_tokens=9,
        temperature=0.5,
        top_k=3,
        top_p=0.9,
        seed=42,
        stop=["x"],
        stop_token_ids=[7],
        drafter="model:small",
        max_draft_tokens=16,
    )
    assert request.prompt_ids == [5, 6] and request.max_new_tokens == 9
    assert (request.sampling.temperature, request.sampling.top_k, request.sampling.top_p, request.sampling.seed) == (
        0.5,
        3,
        0.9,
        42,
    )
    assert str(request.drafter) == "model:small" and request.max_draft_tokens == 16 and request.adaptive
    assert request.stop_token_ids == frozenset({7, 0})  # EOS added
    assert stops == ["x"] and request.max_context == 64
    request, _ = build(token_ids=list(range(63)), ignore_eos=True)  # 63 < 64: fits
    assert request.stop_token_ids == frozenset()
    assert str(request.drafter) == "ngram" and request.sampling.greedy
    request, _ = build(token_ids=None, prompt="hi", drafter="none")
    assert request.prompt_ids == [104, 105] and str(request.drafter) == "none"
    seeds = {build()[0].sampling.seed for _ in range(5)}  # no seed given: a random one
    assert len(seeds) > 1


# ---------------------------------------------------------------- micro-batcher


def test_batcher_batches_concurrent_submissions() -> None:
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        return [2 * x for x in items]

    async def main():
        batcher = MicroBatcher(double, max_batch_size=32)
        try:
            results = await asyncio.gather(*[batcher.submit(i) for i in range(10)])
            lone = await batcher.submit(100)  # a lone request runs at once, alone
            return results, lone, batcher.stats
        finally:
            await batcher.stop()

    results, lone, stats = run(main())
    assert results == [2 * i for i in range(10)] and lone == 200
    assert stats.max_batch_size > 1 and len(batches) < 10 + 1
    assert sorted(x for b in batches for x in b) == list(range(10)) + [100]
    assert stats.items == 11 and stats.queue_depth == 0


def test_batcher_respects_max_batch_size_and_keeps_order() -> None:
    started, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def slow_identity(items: list[str]) -> list[str]:
        started.set()
        release.wait(5)
        sizes.append(len(items))
        return [s.upper() for s in items]

    async def main():
        batcher = MicroBatcher(slow_identity, max_batch_size=3)
        try:
            tasks = [asyncio.ensure_future(batcher.submit(c)) for c in "abcdefgh"]
            # The first batch holds the compute thread; the rest queue behind it.
            assert await asyncio.to_thread(started.wait, 5)
            assert batcher.stats.queue_depth > 0
            release.set()
            return await asyncio.gather(*tasks)
        finally:
            await batcher.stop()

    assert run(main()) == list("ABCDEFGH")
    assert max(sizes) <= 3 and sum(sizes) == 8 and max(sizes) > 1


def test_batcher_propagates_exceptions_and_keeps_working() -> None:
    def picky(items: list[int]) -> list[int]:
        if any(x < 0 for x in items):
            raise ValueError(f"negative in {items}")
        return [x + 1 for x in items]

    async def main():
        batcher = MicroBatcher(picky)
        try:
            outcome = await asyncio.gather(batcher.submit(1), batcher.submit(-1), return_exceptions=True)
            after = await batcher.submit(5)  # the worker survived the failed batch
            alone_bad = await asyncio.gather(batcher.submit(-7), return_exceptions=True)
            called = await batcher.call(lambda: "on the worker thread")
            return outcome, after, alone_bad, called
        finally:
            await batcher.stop()

    outcome, after, alone_bad, called = run(main())
    assert all(isinstance(o, ValueError) for o in outcome)  # both shared the failing batch
    assert after == 6
    assert isinstance(alone_bad[0], ValueError) and "-7" in str(alone_bad[0])
    assert called == "on the worker thread"
    with pytest.raises(ValueError):
        MicroBatcher(picky, max_batch_size=0)


def _chosen(batch: int, acceptance: float, row_s: float, draft_base_s: float = 0.0, draft_row_s: float = 0.0) -> int:
    """k for a request whose every draft token is kept with `acceptance`, in verify passes
    of `batch` sequences costing 35 ms + row_s per row (35 ms: SmolLM2-135M on 2 cores)."""
    k = DraftLength(8, adaptive=True)
    k.first = k.follow = acceptance
    k.update(0, 0, StepCosts(draft_base_s, draft_row_s, pass_base_s=0.035, row_s=row_s, batch_size=batch))
    return k.k


def test_draft_length_backs_off_as_the_verify_batch_fills() -> None:
    """Every sequence's rows are priced: under load only drafts likely to be kept pay."""
    cpu = 0.0014  # a verified row on 2 CPU cores, measured: 8 sequences x 1/2/4 rows = 48/59/82 ms
    for acceptance in (0.3, 0.6, 0.9, 0.97):
        ks = [_chosen(batch, acceptance, cpu) for batch in (1, 2, 4, 8, 16, 32)]
        assert ks == sorted(ks, reverse=True), (acceptance, ks)  # more load never drafts more
    assert _chosen(1, 0.9, cpu) == 8  # alone, rows are nearly free
    assert _chosen(16, 0.97, cpu) >= 2  # copying text keeps drafting under load
    assert _chosen(16, 0.3, cpu) == 0  # a poor guesser decodes plainly
    assert _chosen(8, 0.6, cpu) < _chosen(8, 0.9, cpu)
    assert _chosen(32, 0.8, 0.000005) == 8  # a GPU: rows are nearly free far beyond 32 sequences


def test_a_draft_model_as_dear_as_the_target_is_not_used_under_load() -> None:
    """An int8 copy of the target drafting on the same busy CPU: one drafted token costs
    as much as a verify pass. Worth it alone (where it is cheaper), not with 8 sequences."""
    int8 = {"draft_base_s": 0.0174, "draft_row_s": 0.0036}  # measured: 21 ms for 1 sequence, 46 ms for 8
    assert _chosen(1, 0.92, 0.0003, **int8) > 0
    assert _chosen(8, 0.92, 0.0014, **int8) == 0


def test_draft_length_learns_that_acceptance_comes_in_runs() -> None:
    """n-gram drafts are kept all or nothing: half the drafts fully kept is worth a long
    draft (an independent per-token rate of 1/2 would say 1-2 tokens)."""
    k = DraftLength(8, adaptive=True)
    chosen = []
    for step in range(80):
        proposed = k.k
        k.update(proposed, proposed if step % 2 else 0, StepCosts(pass_base_s=0.05, row_s=0.001, batch_size=1))
        chosen.append(proposed)
    assert 0.3 < k.first < 0.7 and k.follow > 0.99
    assert k.kept_probability(8) > 0.3 and max(chosen[-8:]) == 8
    cut = DraftLength(8, adaptive=True)
    for _ in range(60):  # always 2 of 4 kept: the third is judged and rejected each time
        cut.update(4, 2)
    assert cut.first > 0.99 and abs(cut.follow - 0.5) < 0.01


def test_draft_length_recovers_when_the_text_becomes_copyable_under_load() -> None:
    k = DraftLength(8, adaptive=True)
    costs = StepCosts(pass_base_s=0.035, row_s=0.0014, batch_size=12)  # 2 CPU cores
    for _ in range(40):  # nothing copies: back to plain decoding
        k.update(k.k, 0, costs)
    assert k.k == 0
    for _ in range(60):  # now everything drafted is kept: the probes find it
        k.update(k.k, k.k, costs)
    assert k.k >= 4  # 12 sequences, every row paid for: kept drafts still pay


def _ngram_reference(tokens: list[int], k: int, max_ngram: int = 4, min_ngram: int = 1) -> list[int]:
    """The plain definition: longest tail n-gram first, its most recent earlier occurrence."""
    if k <= 0:
        return []
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = tokens[length - n :]
        for start in range(length - n - 1, -1, -1):
            if tokens[start : start + n] == tail and tokens[start + n : start + n + k]:
                return tokens[start + n : start + n + k]
    return []


def test_ngram_matches_its_plain_definition_on_random_sequences() -> None:
    import random

    rng = random.Random(0)
    for trial in range(400):
        vocab = rng.choice([2, 3, 5, 20])  # small vocabularies: many and overlapping matches
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
        k, max_n, min_n = rng.randrange(0, 6), rng.randrange(1, 6), rng.randrange(1, 3)
        assert ngram_propose(tokens, k, max_n, min_n) == _ngram_reference(tokens, k, max_n, min_n), (
            trial,
            tokens,
            k,
            max_n,
            min_n,
        )


def test_batcher_waits_briefly_for_the_rest_of_the_last_batch() -> None:
    """Sessions of one batch come back a little apart; the next batch waits for them."""
    sizes: list[int] = []

    def run_batch(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return items

    async def main() -> None:
        batcher = MicroBatcher(run_batch, max_batch_size=8, gather_s=60.0)

        async def late(item: int) -> int:  # comes back once the batch of 10 and 11 is gathering
            await until(lambda: batcher.gathering, what="the batcher to gather")
            return await batcher.submit(item)

        await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        await asyncio.gather(batcher.submit(10), batcher.submit(11), late(12), late(13))
        lone = MicroBatcher(run_batch, max_batch_size=8, gather_s=60.0)
        started = asyncio.get_running_loop().time()
        await lone.submit(99)  # a first batch never waits
        assert asyncio.get_running_loop().time() - started < 10.0
        await batcher.stop()
        await lone.stop()

    run(main())
    assert sizes == [4, 4, 1]


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("last_batch", [4, 1])
def test_paired_batchers_gather_while_the_other_runs(paired: bool, last_batch: int) -> None:
    """Embedded, drafting and verification share one compute thread. Sessions that skip
    drafting must not run ahead in a verify batch of their own while the others' drafts
    are computing: that splits the sessions into two half-full cohorts for good."""
    verify_sizes: list[int] = []

    def verify(items: list[int]) -> list[int]:
        verify_sizes.append(len(items))
        return items

    def draft(items: list[int]) -> list[int]:
        time.sleep(0.1)  # a draft model's forward pass, on the compute thread
        return items

    async def main() -> None:
        verifier = MicroBatcher(verify, max_batch_size=8, gather_s=0.02)
        drafter = MicroBatcher(draft, max_batch_size=8, gather_s=0.02)
        if paired:
            verifier.share_compute_with(drafter, gather_s=0.02)
        # The last batch held 4, or 1: sessions already split into cohorts of one.
        await asyncio.gather(*(verifier.submit(i) for i in range(last_batch)))

        async def drafted(item: int) -> int:
            return await verifier.submit(await drafter.submit(item))

        await asyncio.gather(verifier.submit(10), verifier.submit(11), drafted(12), drafted(13))
        await verifier.stop()
        await drafter.stop()

    run(main())
    assert verify_sizes == [last_batch] + ([4] if paired else [2, 2])


def test_pass_cost_fits_base_and_row_cost() -> None:
    cost = PassCost()
    for _ in range(50):  # one size only: the slope is unknown, rows count as free
        cost.observe(8, 0.048)
    assert cost.row_s == 0.0 and abs(cost.base_s - 0.048) < 1e-9
    rng = random.Random(0)
    for _ in range(400):  # 35 ms + 1.4 ms a row, with noise
        rows = rng.randrange(8, 73)
        cost.observe(rows, 0.035 + 0.0014 * rows + rng.gauss(0, 0.002))
    assert abs(cost.row_s - 0.0014) < 0.0002 and abs(cost.base_s - 0.035) < 0.005
