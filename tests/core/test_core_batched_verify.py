"""Batched verification (`rejection_sample_batch`, `TargetWorker.verify_batch`) equals the
per-item reference token for token, and reads the device back a constant number of times
per verify batch, whatever the batch size and draft length."""

from __future__ import annotations

import random

import pytest
import torch

from specdec.core import transfer
from specdec.core.rejection import RejectionInput, rejection_sample, rejection_sample_batch
from specdec.core.runner import CausalLM, build_runner
from specdec.core.sampling import RowSampling, SamplingParams, probs_from_logits, probs_from_logits_rows, quantize_f16
from specdec.core.target import TargetWorker, batch_token_logprobs
from specdec.core.types import TokenLogprob, Verdict, VerifyItem

PARAM_CHOICES = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.5, top_k=7, top_p=0.9),
    SamplingParams(temperature=0.9, min_p=0.05),
    SamplingParams(temperature=1.1, top_k=40, top_p=0.95, min_p=0.02),
    SamplingParams(temperature=2.0, top_p=0.3),
]


def random_item(rng: random.Random, vocab: int, max_k: int) -> RejectionInput:
    """A verify item with random logits (sometimes coarse, so ties occur), draft length,
    parameters, seed, and q given or one-hot; drafts drawn from q, or near the argmax."""
    k = rng.randint(0, max_k)
    base = SamplingParams() if rng.random() < 0.25 else rng.choice(PARAM_CHOICES)
    params = SamplingParams(base.temperature, base.top_k, base.top_p, rng.randrange(1 << 64), base.min_p)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 31))
    logits = torch.randn(k + 1, vocab, generator=gen) * rng.choice([0.5, 2.0, 6.0])
    if rng.random() < 0.3:
        logits = (logits * 2).round() / 2  # ties in the top-k / top-p boundaries
    if rng.random() < 0.2:
        logits = logits.double()  # penalised rows arrive in float64
    drafts = [rng.randrange(vocab) for _ in range(k)]
    q = None
    if not params.greedy and k and rng.random() < 0.5:
        draft_logits = logits[:k].float() + torch.randn(k, vocab, generator=gen) * 0.5
        q = quantize_f16(probs_from_logits(draft_logits, params))
        drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
    elif rng.random() < 0.6:  # mostly right drafts, so whole drafts are accepted too
        drafts = [int(t) if rng.random() < 0.8 else d for t, d in zip(logits[:k].argmax(-1), drafts)]
    return RejectionInput(logits, drafts, q, params, rng.randrange(1 << 20))


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """The reference, item by item: float64 log-softmax of each row, the token's value and
    the `top` alternatives."""
    rows = torch.log_softmax(logits[: len(tokens)].to(torch.float64), dim=-1)
    chosen = rows[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    if top <= 0:
        return [TokenLogprob(lp) for lp in chosen]
    values, ids = rows.topk(min(top, rows.shape[-1]), dim=-1)
    return [TokenLogprob(lp, list(zip(i, v))) for lp, i, v in zip(chosen, ids.tolist(), values.tolist())]


@pytest.mark.parametrize("by_item", [True, False], ids=["by-item", "stacked"])
@pytest.mark.parametrize("seed", range(12))
def test_batched_equals_per_item_reference(seed: int, by_item: bool) -> None:
    """Both layouts of the row-wise work: item by item (a CPU's default) and all rows
    stacked (an accelerator's), here both on the CPU."""
    rng = random.Random(seed)
    vocab = rng.choice([7, 50, 301, 2048])
    for _ in range(4):
        items = [random_item(rng, vocab, max_k=rng.choice([1, 4, 8])) for _ in range(rng.randint(1, 24))]
        batched = rejection_sample_batch(items, by_item)
        for item, out in zip(items, batched, strict=True):
            want = rejection_sample(item)
            assert (out.num_accepted, out.tokens) == (want.num_accepted, want.tokens)


def test_batched_outcomes_cover_every_case() -> None:
    """The comparison above has power: accepted-all (bonus), rejected at the first and at a
    middle position, greedy and sampled all occur."""
    rng = random.Random(99)
    seen = set()
    for _ in range(10):
        items = [random_item(rng, 50, max_k=4) for _ in range(16)]
        for item, out in zip(items, rejection_sample_batch(items)):
            k = len(item.draft_tokens)
            where = "all" if out.num_accepted == k else ("first" if out.num_accepted == 0 else "middle")
            seen.add((item.sampling.greedy, item.draft_probs is not None, where))
    for greedy, given in [(True, False), (False, False), (False, True)]:
        for where in ("all", "first", "middle"):
            assert (greedy, given, where) in seen


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_one_device_read_per_batch(batch: int, k: int) -> None:
    rng = random.Random(batch * 10 + k)
    items = [random_item(rng, 300, max_k=k) for _ in range(batch)]
    before = transfer.STATS.to_host, transfer.STATS.to_device
    rejection_sample_batch(items)
    assert transfer.STATS.to_host - before[0] == 1
    assert transfer.STATS.to_device - before[1] <= 8 + len(items)  # layouts, uniforms, row parameters; q item by item


@pytest.mark.parametrize("seed", range(6))
def test_row_processing_is_bit_identical(seed: int) -> None:
    """probs_from_logits_rows equals probs_from_logits bit for bit on every row, so the
    acceptance ratios (not only the tokens drawn) are the reference's."""
    rng = random.Random(1000 + seed)
    vocab = rng.choice([50, 301, 4096])
    items = [random_item(rng, vocab, max_k=6) for _ in range(20)]
    sampled = [item for item in items if not item.sampling.greedy]
    rows = [item.sampling for item in sampled for _ in range(item.target_logits.shape[0])]
    stacked = torch.cat([item.target_logits.double() for item in sampled])
    got = probs_from_logits_rows(stacked, RowSampling.build(rows, vocab, stacked.device))
    want = torch.cat([probs_from_logits(item.target_logits, item.sampling) for item in sampled])
    assert torch.equal(got, want)


def verify_items(rng: random.Random, batch: int, k: int, vocab: int, logprobs: int = -1) -> list[VerifyItem]:
    """New sessions with random prompts and k drafts: greedy, sampled with q, sampled
    one-hot and penalised items in turn."""
    items = []
    for b in range(batch):
        kind = b % 4
        params = (
            SamplingParams() if kind == 0 else SamplingParams(temperature=0.8, top_k=50, seed=rng.randrange(1 << 32))
        )
        if kind == 3:
            params = SamplingParams(temperature=0.9, repetition_penalty=1.3, seed=rng.randrange(1 << 32))
        q = quantize_f16(torch.softmax(torch.randn(k, vocab), -1)) if kind == 1 else None
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(3, 12))]
        drafts = [rng.randrange(vocab) for _ in range(k)]
        items.append(VerifyItem(f"s{rng.random()}", 0, prompt, drafts, q, params, logprobs=logprobs))
    return items


@pytest.fixture(scope="module")
def worker(target_model: CausalLM) -> TargetWorker:
    return TargetWorker(build_runner(target_model), prefill_chunk_s=0, judge="batched")


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_verify_batch_reads_back_a_constant_number_of_times(worker: TargetWorker, batch: int, k: int) -> None:
    rng = random.Random(batch * 100 + k)
    vocab = worker.runner.vocab_size
    for logprobs, reads in [(-1, 1), (3, 2)]:  # the verdicts; then the log-probabilities
        items = verify_items(rng, batch, k, vocab, logprobs)
        before = transfer.STATS.to_host
        verdicts = worker.verify_batch(items)
        assert transfer.STATS.to_host - before == reads
        assert all(isinstance(v, Verdict) and len(v.tokens) == v.num_accepted + 1 for v in verdicts)
        # Steps after the prefill: the same count.
        steps = [
            VerifyItem(
                item.session_id,
                len(item.tokens),
                v.tokens,
                item.draft_tokens,
                item.draft_probs,
                item.sampling,
                logprobs,
            )
            for item, v in zip(items, verdicts)
            if isinstance(v, Verdict)
        ]
        before = transfer.STATS.to_host
        assert all(isinstance(v, Verdict) and not v.needs_resync for v in worker.verify_batch(steps))
        assert transfer.STATS.to_host - before == reads


@pytest.mark.parametrize("seed", range(3))
def test_batched_logprobs_equal_per_item(seed: int) -> None:
    rng = random.Random(seed)
    wanted = []
    for _ in range(8):
        n = rng.randint(1, 6)
        logits = torch.randn(n + 2, 64) * 3
        if rng.random() < 0.5:
            logits = logits.round()  # ties among the alternatives
        wanted.append((logits, [rng.randrange(64) for _ in range(n)], rng.choice([0, 1, 3, 5, 100])))
    for (logits, tokens, top), got in zip(wanted, batch_token_logprobs(wanted), strict=True):
        assert got == token_logprobs(logits, tokens, top)


def test_the_judge_is_chosen_by_measuring_and_both_judges_agree(monkeypatch):
    from specdec.core import judge

    batch = judge.sample_batch(300, torch.device("cpu"))
    batched, per_item = (judge.JUDGES[name](batch) for name in ("batched", "per_item"))
    assert [(o.num_accepted, o.tokens) for o in batched] == [(o.num_accepted, o.tokens) for o in per_item]
    real = judge._measure(300, torch.device("cpu"), rounds=1)
    assert set(real) == set(judge.JUDGES) and all(0 < t < 60 for t in real.values()), real

    measured = []

    def fake(times: dict[str, float]):
        return lambda vocab, device: measured.append(vocab) or times

    monkeypatch.setattr(judge, "_CHOSEN", {})
    monkeypatch.setattr(judge, "_measure", fake({"batched": 2.0, "per_item": 1.0}))
    assert judge.choose_judge(300, "cpu") == "per_item" and judge.choose_judge(300, "cpu") == "per_item"
    assert measured == [300]  # once per device and vocabulary
    monkeypatch.setattr(judge, "_measure", fake({"batched": 1.0, "per_item": 2.0}))
    assert judge.choose_judge(301, "cpu") == "batched"
