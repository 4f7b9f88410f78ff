"""KV caches roll back exactly; the flattened runner equals HF's forward; the target
session's cache never holds an uncommitted token."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import VOCAB, IdTokenizer, run

from specdec.core import kv_cache
from specdec.core.attention import BatchAttention
from specdec.core.drafters.worker import DraftWorker
from specdec.core.generation import generate
from specdec.core.interfaces import Tiers
from specdec.core.kv_cache import KVPool, SessionKV, SessionTable
from specdec.core.local import LocalDrafter, LocalVerifier
from specdec.core.loop import GenerationRequest
from specdec.core.runner import ForwardItem, HFRunner, ModelRunner, build_runner
from specdec.core.sampling import SamplingParams
from specdec.core.target import TargetWorker
from specdec.core.types import ProposeItem, VerifyItem


def tokens(seed: int, n: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(VOCAB) for _ in range(n)]


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("runner_cls", [ModelRunner, HFRunner])
def test_truncate_and_refeed_equals_fresh_forward(target_model, runner_cls) -> None:
    runner = runner_cls(target_model)
    seq = tokens(1, 100)  # crosses the initial capacity of 64: exercises growth too
    full = hf_logits(target_model, seq)
    kv = runner.new_kv()
    out = runner.forward([ForwardItem(kv, seq[:30], 30)])[0]
    assert torch.allclose(out, full[:30], atol=1e-5)
    # Speculate 8 junk tokens, roll back, feed the real ones in pieces.
    runner.forward([ForwardItem(kv, tokens(2, 8), 1)])
    assert kv.length == 38
    kv.truncate(30)
    assert kv.token_ids == seq[:30]
    out = runner.forward([ForwardItem(kv, seq[30:75], 45)])[0]
    assert torch.allclose(out, full[30:75], atol=1e-5)
    # Roll back deep, into the middle, then re-grow past the end.
    kv.truncate(12)
    out = runner.forward([ForwardItem(kv, seq[12:99], 3)])[0]
    assert torch.allclose(out, full[96:99], atol=1e-5)
    out = runner.forward([ForwardItem(kv, seq[99:100], 1)])[0]
    assert torch.allclose(out, full[99:100], atol=1e-5)
    assert kv.token_ids == seq


def test_flattened_batch_equals_hf_forward_per_sequence(target_model) -> None:
    runner = build_runner(target_model)
    assert isinstance(runner, ModelRunner)
    seqs = [tokens(10 + i, n) for i, n in enumerate([5, 17, 70, 1, 33])]
    kvs = [runner.new_kv() for _ in seqs]
    # Step 1: different prompt lengths (one of a single token) in one flattened batch.
    prefix = [3, 9, 40, 1, 33]
    outs = runner.forward([ForwardItem(kv, s[:n], min(n, 4)) for kv, s, n in zip(kvs, seqs, prefix)])
    for s, n, out in zip(seqs, prefix, outs):
        assert out.shape == (min(n, 4), VOCAB)
        assert torch.allclose(out, hf_logits(target_model, s[:n])[-min(n, 4) :], atol=1e-4)
    # Step 2: each continues from its own cache length with a different number of new
    # tokens; one sequence sits this step out, another joins fresh.
    late = runner.new_kv()
    late_seq = tokens(99, 12)
    step = [(kvs[0], seqs[0], 3, 5), (kvs[1], seqs[1], 9, 17), (kvs[2], seqs[2], 40, 41), (late, late_seq, 0, 12)]
    outs = runner.forward([ForwardItem(kv, s[a:b], b - a) for kv, s, a, b in step])
    for (kv, s, a, b), out in zip(step, outs):
        assert torch.allclose(out, hf_logits(target_model, s[:b])[a:b], atol=1e-4)
        assert kv.token_ids == s[:b]


def test_session_kv_bookkeeping() -> None:
    pool = KVPool(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    kv = SessionKV(pool)
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    kv.reserve(3)
    assert kv.capacity == 64
    keys, values = kv.write(0, 0, k, -k)
    kv.commit([7, 8, 9])
    assert keys.shape == (2, 3, 4) and torch.equal(keys, k) and torch.equal(values, -k)
    kv.reserve(100)  # moving to a larger slot keeps the valid prefix and frees the old slot
    assert kv.capacity == 128 and pool.classes[64].slabs[0].used == 0 and pool.classes[128].slabs[0].used == 1
    assert torch.equal(kv.read(0, 0, 3)[0], k) and torch.equal(kv.read(0, 0, 3)[1], -k)
    assert kv.common_prefix([7, 8, 9, 10]) == 3
    assert kv.common_prefix([7, 5, 9]) == 1
    assert kv.common_prefix([]) == 0
    kv.truncate(1)
    assert kv.token_ids == [7] and kv.length == 1
    with pytest.raises(AssertionError):
        kv.truncate(2)
    table = SessionTable(2)
    table.put("a", 1)
    table.put("b", 2)
    assert table.get("a") == 1  # "a" is now the most recent
    table.put("c", 3)
    assert table.get("b") is None and table.get("a") == 1 and len(table) == 2
    with pytest.raises(ValueError):
        SessionTable(0)


def test_a_collection_inside_slab_allocation_does_not_deadlock(monkeypatch) -> None:
    """Allocating a slab can run the garbage collector while the pool's lock is held; the
    finalizer of a dropped session then releases its slot on the same thread. That must
    not wait for the lock (it did: the tier froze for good), and the slot must come back."""
    import gc
    import threading

    monkeypatch.setattr(kv_cache, "MAX_SLAB_SLOTS", 1)  # every session needs a new slab
    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    init = kv_cache.Slab.__init__

    def collecting_init(self, *args, **kwargs):
        gc.collect(0)  # what a large allocation may trigger (the young generation: where the dropped cycle is)
        init(self, *args, **kwargs)

    monkeypatch.setattr(kv_cache.Slab, "__init__", collecting_init)

    def load() -> None:
        for _ in range(20):
            dropped = SessionKV(pool)
            dropped.reserve(10)
            dropped.cycle = dropped  # only the collector frees it: inside the next allocation
            del dropped
            kept = SessionKV(pool)
            kept.reserve(10)
            del kept

    gc.disable()  # collections happen only where this test puts them
    try:
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), "the pool deadlocked on a release from inside an allocation"
    finally:
        gc.enable()
    gc.collect()
    spare = SessionKV(pool)
    spare.reserve(1)  # takes back every queued slot
    assert sum(slab.used for slab in pool.classes[64].slabs.values()) == 1
    assert len(pool.classes[64].slabs) <= 2  # emptied slabs were dropped, one spare kept


def test_slots_are_packed_reused_and_freed(monkeypatch) -> None:
    monkeypatch.setattr(kv_cache, "MAX_SLAB_SLOTS", 4)
    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    kvs = [SessionKV(pool) for _ in range(6)]
    for kv in kvs:
        kv.reserve(10)
    slots = pool.classes[64]
    assert [(kv.slab.number, kv.index) for kv in kvs] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    first = kvs[0].slab.keys[0]
    del kvs[1]  # garbage collection frees the slot, and it is reused first
    late = SessionKV(pool)
    late.reserve(1)
    assert (late.slab.number, late.index) == (0, 1)
    assert late.slab.keys[0] is first  # a new slab was added, nothing was moved
    del kvs[3:], kv  # slab 1 empties: kept as the one spare
    assert sorted(slots.slabs) == [0, 1]
    del kvs, late
    assert sorted(slots.slabs) == [0] and slots.slabs[0].used == 0  # memory back after the peak
    again = SessionKV(pool)
    again.reserve(1)
    assert (again.slab.number, again.index) == (0, 0)


def test_grouped_attention_equals_hf_with_idle_slots_between(target_model) -> None:
    """Sessions of one bucket attend in one call, over slot ranges with idle slots in them."""
    runner = build_runner(target_model)
    seqs = [tokens(40 + i, 30 + 7 * i) for i in range(6)]
    kvs = [runner.new_kv() for _ in seqs]
    runner.forward([ForwardItem(kv, s[:20], 1) for kv, s in zip(kvs, seqs)])
    chosen = [0, 2, 3, 5]  # slots 1 and 4 sit this step out: padded over, not attended
    feeds = [(kvs[i], seqs[i], 20, 20 + 1 + i) for i in chosen]
    items = [ForwardItem(kv, s[a:b], b - a) for kv, s, a, b in feeds]
    plan = BatchAttention(
        [item.kv for item in items],
        [20] * 4,
        [b - a for _, _, a, b in feeds],
        runner.num_heads,
        runner.num_kv_heads,
        runner.device,
    )
    assert len(plan.groups) == 1 and not plan.singles and plan.groups[0].num_slots == 6  # slots 0..5 of one slab
    outs = runner.forward(items)
    for (kv, s, a, b), out in zip(feeds, outs):
        assert torch.allclose(out, hf_logits(target_model, s[:b])[a:b], atol=1e-4)


class CheckingTargetWorker(TargetWorker):
    """Asserts the cache invariant after every verification batch."""

    checks = 0

    def verify_batch(self, items):
        verdicts = super().verify_batch(items)
        for item, verdict in zip(items, verdicts):
            if verdict.needs_resync:
                continue
            session = self.sessions.get(item.session_id)
            assert session is not None
            assert session.kv.token_ids == session.tokens[:-1], "cache holds an uncommitted token"
            assert session.kv.length == len(session.tokens) - 1
            self.checks += 1
        return verdicts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_target_cache_never_holds_uncommitted_tokens(target_model, draft_model, temperature) -> None:
    worker = CheckingTargetWorker(build_runner(target_model))
    verifier = LocalVerifier(worker)
    drafter = LocalDrafter(DraftWorker(build_runner(draft_model), "small"))
    prompts = [tokens(5, 6) * 3, tokens(6, 11)]

    async def main():
        requests = [
            GenerationRequest(
                f"s{i}", p, 30, SamplingParams(temperature=temperature, seed=i), drafter=d, max_draft_tokens=4
            )
            for i, (p, d) in enumerate([(p, d) for p in prompts for d in ("model:small", "ngram")])
        ]
        return await asyncio_gather(*[generate(r, Tiers(verifier, drafter), IdTokenizer(), []) for r in requests])

    results = run(main())
    assert all(len(r.token_ids) == 30 for r in results)
    assert worker.checks >= 4 * 5
    assert sum(r.stats.proposed_tokens - r.stats.accepted_tokens for r in results) > 0  # rejections happened
    assert len(worker.sessions) == 0  # released at the end


def test_target_worker_direct_verify_steps(target_model) -> None:
    """Hand-built verify items: rejections roll back, the committed tokens are the target's
    greedy ones, and a stale prefix asks for a resync."""
    worker = TargetWorker(build_runner(target_model))
    prompt = tokens(7, 9)
    greedy = SamplingParams()
    committed = list(prompt)
    sent = 0
    for step in range(6):
        truth = hf_logits(target_model, committed)[-1].argmax().item()
        # Drafts: right first token on even steps, garbage otherwise.
        first = truth if step % 2 == 0 else (truth + 1) % VOCAB
        draft = [first, 3, 4]
        verdict = worker.verify_batch([VerifyItem("x", sent, committed[sent:], draft, None, greedy)])[0]
        assert not verdict.needs_resync
        assert verdict.tokens[0] == truth
        if step % 2 == 0:
            assert verdict.num_accepted >= 1
        else:
            assert (verdict.num_accepted, verdict.tokens) == (0, [truth])
        for i in range(1, len(verdict.tokens)):  # every committed token is the greedy one
            assert verdict.tokens[i] == hf_logits(target_model, committed + verdict.tokens[:i])[-1].argmax().item()
        committed += verdict.tokens
        sent = len(committed)
        session = worker.sessions.get("x")
        assert session.tokens == committed
        assert session.kv.token_ids == committed[:-1]
    # A caller rewriting history (a replayed session): the cache keeps only the common prefix.
    rewritten = committed[:4] + tokens(17, 6)
    verdict = worker.verify_batch([VerifyItem("x", 4, rewritten[4:], [], None, greedy)])[0]
    assert verdict.tokens == [hf_logits(target_model, rewritten)[-1].argmax().item()]
    session = worker.sessions.get("x")
    assert session.tokens == rewritten + verdict.tokens and session.kv.token_ids == rewritten
    stale = worker.verify_batch([VerifyItem("unknown", 5, [1], [], None, greedy)])[0]
    assert stale.needs_resync
    assert worker.stats.forward_passes == 7 and worker.stats.max_batch_size == 1


def asyncio_gather(*aws):
    import asyncio

    return asyncio.gather(*aws)


@torch.inference_mode()
def hf_greedy_continuation(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


def test_draft_worker_rolls_back_and_drafts_from_committed_tokens(draft_model) -> None:
    """After partial acceptance the draft cache is rolled back, so each proposal is the
    draft model's own continuation of the committed tokens; sampled drafts come with the
    quantised q they were drawn from."""
    from specdec.core.errors import InvalidArgument
    from specdec.core.rng import Purpose, sample_index, uniform
    from specdec.core.sampling import probs_from_logits, quantize_f16

    worker = DraftWorker(build_runner(draft_model), "small")
    committed, sent = tokens(8, 10), 0
    for step in range(5):
        proposal = worker.propose_batch([ProposeItem("d", sent, committed[sent:], 4, SamplingParams(), "model:small")])[
            0
        ]
        assert proposal.probs is None and not proposal.needs_resync
        assert proposal.tokens == hf_greedy_continuation(draft_model, committed, 4), step
        session = worker.sessions.get("d")
        assert session.tokens == committed
        assert session.kv.token_ids == committed + proposal.tokens[:-1]
        # The "target" keeps the first step % 3 drafts, then substitutes its own token;
        # the drafter holds the tokens committed when it proposed (as in the loop).
        kept = step % 3
        sent = len(committed)
        committed = committed + proposal.tokens[:kept] + [(proposal.tokens[kept] + 1) % VOCAB]
    # A caller rewriting history (a replayed session): cached tokens past the common
    # prefix are dropped, not reused.
    rewritten = committed[:5] + tokens(9, 7)
    proposal = worker.propose_batch([ProposeItem("d", 5, rewritten[5:], 3, SamplingParams(), "model:small")])[0]
    assert proposal.tokens == hf_greedy_continuation(draft_model, rewritten, 3)
    committed, sent = rewritten, len(rewritten)
    params = SamplingParams(temperature=0.8, top_k=50, seed=77)
    proposal = worker.propose_batch([ProposeItem("d", sent, [], 3, params, "model:small")])[0]
    assert proposal.probs.shape == (3, VOCAB) and proposal.probs.dtype == torch.float64
    assert torch.allclose(proposal.probs.sum(-1), torch.ones(3, dtype=torch.float64))
    context = list(committed)
    for i, token in enumerate(proposal.tokens):
        q = proposal.probs[i]
        assert torch.equal(q, quantize_f16(q[None])[0])  # exactly the float16 wire values
        assert token == sample_index(q, uniform(77, len(committed) + i, Purpose.DRAFT))
        expected = quantize_f16(probs_from_logits(hf_logits(draft_model, context)[-1:], params))[0]
        assert torch.allclose(q, expected, atol=2e-3)
        assert int((q > 0).sum()) == 50
        context.append(token)
    ngram_item = ProposeItem("n", 0, [1, 2, 3, 1, 2], 2, params, "ngram")
    ngram = worker.propose_batch([ngram_item])[0]
    assert ngram.tokens == [3, 1] and ngram.probs is None
    assert worker.propose_batch([ProposeItem("gone", 4, [1], 2, params, "ngram")])[0].needs_resync
    unserved = worker.propose_batch([ProposeItem("x", 0, [1], 2, params, "model:other"), ngram_item])
    assert isinstance(unserved[0], InvalidArgument) and unserved[1].tokens == [3, 1]  # it fails alone
    assert DraftWorker().drafters == ["ngram", "suffix", "suffix-chain"]
    assert worker.drafters == ["ngram", "suffix", "suffix-chain", "model:small"]


def test_idle_sessions_are_dropped_least_recent_first(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(kv_cache.time, "monotonic", lambda: now[0])
    table: SessionTable[list[int]] = SessionTable(10)
    table.put("old", [1])
    now[0] += 50
    table.put("mid", [2])
    now[0] += 50
    table.put("new", [3])
    assert table.get("old") == [1]  # used again: now the most recent
    now[0] += 70  # old and new were used 70 s ago, mid 120 s ago
    assert table.drop_idle(100) == 1 and table.get("mid") is None
    assert table.drop_idle(100) == 0 and len(table) == 2
    now[0] += 31
    assert table.drop_idle(100) == 2 and len(table) == 0


def test_a_sessions_second_item_in_one_batch_waits_for_the_next(target_model) -> None:
    """A caller (a stranger) sending two steps of one session in one batch: the second is
    answered NOT_YET (the batcher runs it in the next pass), never fed beside the first
    into the same cache (that once failed the pass with an AssertionError)."""
    from specdec.core.batcher import NOT_YET

    worker = TargetWorker(ModelRunner(target_model), judge="per_item")
    prompt = tokens(11, 12)
    first = VerifyItem("s", 0, prompt, [], None, SamplingParams())
    again = VerifyItem("s", 0, prompt[:5], [], None, SamplingParams())
    other = VerifyItem("o", 0, prompt, [], None, SamplingParams())
    verdicts = worker.verify_batch([first, again, other])
    assert verdicts[1] is NOT_YET and verdicts[0].tokens == verdicts[2].tokens
    assert worker.verify_batch([again])[0].tokens  # then it runs alone
    draft = DraftWorker()
    item = ProposeItem("s", 0, [1, 2, 3, 1, 2], 2, SamplingParams(), "ngram")
    proposals = draft.propose_batch([item, item])
    assert proposals[0].tokens == [3, 1] and proposals[1] is NOT_YET
