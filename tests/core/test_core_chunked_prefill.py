"""Chunked prefill: a long prompt runs chunk by chunk, sharing passes with other sessions'
steps, and changes nothing in the output (greedy identical to one-pass prefill and to HF,
sampled identical by seed), with the prefix store restoring part of it; the chunk size
follows the fitted prefill cost; a caller that leaves is not run again."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tiny_models import IdTokenizer, run

from specdec.core.batcher import NOT_YET, MicroBatcher
from specdec.core.cost import MIN_PREFILL_CHUNK, PrefillCost
from specdec.core.drafters.worker import DraftWorker
from specdec.core.generation import generate
from specdec.core.interfaces import Tiers
from specdec.core.kv_cache import SessionKV
from specdec.core.local import LocalDrafter, LocalVerifier
from specdec.core.loop import GenerationRequest
from specdec.core.runner import ForwardItem, HFRunner, build_runner
from specdec.core.sampling import SamplingParams
from specdec.core.target import TargetWorker

NEW_TOKENS = 24
LONG = [(7 * i * i + 3 * i + 11) % 256 for i in range(150)]  # 150 tokens: many chunks of 7
SHORT = [[215, 20, 132, 248, 207, 155] * 2, [9, 200, 31, 77, 4, 250, 18]]


@pytest.fixture(scope="module")
def hf_greedy(target_model) -> dict[tuple[int, ...], list[int]]:
    out = {}
    with torch.inference_mode():
        for prompt in [LONG, *SHORT]:
            ids = torch.tensor([prompt])
            gen = target_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
            )
            out[tuple(prompt)] = gen[0, len(prompt) :].tolist()
    return out


class Passes:
    """Records what each forward pass of a runner ran: (tokens, num_logits) per item."""

    def __init__(self, runner) -> None:
        self.log: list[list[tuple[int, int]]] = []
        forward = runner.forward

        def recorded(items: list[ForwardItem]):
            self.log.append([(len(item.tokens), item.num_logits) for item in items])
            return forward(items)

        runner.forward = recorded

    def chunks(self) -> int:
        return sum(1 for items in self.log for _, logits in items if logits == 0)

    def shared(self) -> int:
        """Passes that ran a prefill chunk next to another session's step."""
        return sum(1 for items in self.log if any(n == 0 for _, n in items) and any(n > 0 for _, n in items))


def tiers(target_model, draft_model, store=None, **worker_kw) -> tuple[Tiers, TargetWorker, Passes]:
    runner = build_runner(target_model)
    passes = Passes(runner)
    worker = TargetWorker(runner, prefix_store=store, **worker_kw)
    return Tiers(LocalVerifier(worker), LocalDrafter(DraftWorker(build_runner(draft_model), "small"))), worker, passes


def request(session: str, prompt: list[int], drafter: str = "none", **sampling) -> GenerationRequest:
    params = SamplingParams(**sampling)
    return GenerationRequest(session, list(prompt), NEW_TOKENS, params, drafter, max_draft_tokens=4, adaptive=False)


def generate_all(t: Tiers, requests: list[GenerationRequest]):
    async def main():
        return await asyncio.gather(*[generate(r, t, IdTokenizer(), []) for r in requests])

    return run(main())


@pytest.mark.parametrize("drafter", ["none", "ngram", "model:small"])
def test_chunked_prefill_is_token_identical(drafter, target_model, draft_model, hf_greedy) -> None:
    t, worker, passes = tiers(target_model, draft_model, prefill_chunk_tokens=7)
    (result,) = generate_all(t, [request("long", LONG, drafter)])
    assert result.token_ids == hf_greedy[tuple(LONG)]
    # 150 prompt tokens: every pass but the last ran 7 of them, without logits.
    assert passes.log[0] == [(7, 0)]
    assert passes.chunks() == (len(LONG) - 1 - (MIN_PREFILL_CHUNK + 1)) // 7 + 1
    assert len(worker.sessions) == 0


def test_chunks_share_passes_with_other_sessions(target_model, draft_model, hf_greedy) -> None:
    t, _, passes = tiers(target_model, draft_model, prefill_chunk_tokens=7)
    requests = [request("short0", SHORT[0], "ngram"), request("long", LONG), request("short1", SHORT[1])]
    results = generate_all(t, requests)
    for r, result in zip(requests, results):
        assert result.token_ids == hf_greedy[tuple(r.prompt_ids)], r.session_id
    assert passes.shared() > 5  # the short sessions decoded while the long prompt prefilled
    # Each short session's step ran with at most one chunk beside it: nobody waited for the whole prompt.
    assert max(sum(1 for _, n in items if n == 0) for items in passes.log) == 1


def test_sampled_output_unchanged_by_chunking(target_model, draft_model) -> None:
    sampling = dict(temperature=0.9, top_p=0.95, seed=11)
    outputs = []
    for kw in (dict(prefill_chunk_s=0.0), dict(prefill_chunk_tokens=5)):
        t, _, passes = tiers(target_model, draft_model, **kw)
        results = generate_all(t, [request("a", LONG, "model:small", **sampling), request("b", SHORT[0], **sampling)])
        outputs.append([r.token_ids for r in results])
        assert (passes.chunks() > 0) == ("prefill_chunk_tokens" in kw)
    assert outputs[0] == outputs[1]


def test_time_budget_chunks_follow_the_cost_model(target_model, draft_model, hf_greedy) -> None:
    """A budget below any chunk's cost: every chunk is the minimum, and the output holds."""
    t, worker, passes = tiers(target_model, draft_model, prefill_chunk_s=1e-9)
    (result,) = generate_all(t, [request("long", LONG, "ngram")])
    assert result.token_ids == hf_greedy[tuple(LONG)]
    sizes = [n for items in passes.log for n, logits in items if logits == 0]
    assert sizes[0] == 64 and all(n == MIN_PREFILL_CHUNK for n in sizes[1:]) and len(sizes) > 3
    assert worker.prefill_cost.chunks == len(sizes) and worker.prefill_cost.token_s > 0


def test_prefill_cost_fits_tokens_and_attention() -> None:
    cost = PrefillCost()
    assert cost.chunk_tokens(0, 0.25, initial=64) == 64  # nothing measured yet
    token_s, pair_s = 1e-3, 2e-7  # a chunk: 1 ms a token, plus 0.2 us a query-key pair

    def truth(start: int, n: int) -> float:
        return token_s * n + pair_s * PrefillCost.pairs(start, n)

    cost.observe([(0, 100)], truth(0, 100))
    assert cost.token_s == pytest.approx(truth(0, 100) / 100)  # one chunk: all of it per token
    for start, n in [(100, 200), (300, 150), (450, 300), (750, 120)]:
        cost.observe([(start, n)], truth(start, n))
    assert cost.token_s == pytest.approx(token_s, rel=1e-6) and cost.pair_s == pytest.approx(pair_s, rel=1e-6)
    assert cost.chunk_tokens(0, 0.25, initial=64) == 2 * 120  # the fit says more, growth is capped
    for start in (1000, 7000):
        cost.last_tokens = 10_000
        n = cost.chunk_tokens(start, 0.25, initial=64)
        assert truth(start, n) <= 0.25 < truth(start, n + 1)
    assert cost.chunk_tokens(7000, 1e-6, initial=64) == MIN_PREFILL_CHUNK


class DictStore:
    """An in-process PrefixStore: KV of whole chunks of CHUNK tokens, by token prefix."""

    CHUNK = 32

    def __init__(self) -> None:
        self.chunks: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.restored = 0

    def restore(self, tokens: list[int], kv: SessionKV) -> int:
        before = start = kv.length - kv.length % self.CHUNK
        while start + self.CHUNK <= len(tokens) and tuple(tokens[: start + self.CHUNK]) in self.chunks:
            start += self.CHUNK
        if start <= kv.length:
            return 0
        kv.truncate(before)
        kv.reserve(start)
        for end in range(before + self.CHUNK, start + 1, self.CHUNK):
            for layer, (k, v) in enumerate(self.chunks[tuple(tokens[:end])]):
                kv.write(layer, end - self.CHUNK, k, v)
        grown = start - kv.length
        kv.commit(tokens[before:start])
        self.restored += grown
        return grown

    def offer(self, tokens: list[int], kv: SessionKV) -> None:
        assert kv.pool is not None
        for end in range(self.CHUNK, kv.common_prefix(tokens) + 1, self.CHUNK):
            key = tuple(tokens[:end])
            if key not in self.chunks:
                layers = range(kv.pool.num_layers)
                self.chunks[key] = [tuple(t.clone() for t in kv.read(i, end - self.CHUNK, end)) for i in layers]


def test_prefix_store_restores_then_chunks_the_rest(target_model, draft_model, hf_greedy) -> None:
    store = DictStore()
    t, _, passes = tiers(target_model, draft_model, store=store, prefill_chunk_tokens=9)
    generate_all(t, [request("first", LONG[:100])])  # offers the chunks of its prompt as they complete
    assert len(store.chunks) == 100 // DictStore.CHUNK
    before = passes.chunks()
    (result,) = generate_all(t, [request("second", LONG, "ngram")])
    assert result.token_ids == hf_greedy[tuple(LONG)]
    assert store.restored == 96  # three chunks from the store, the rest computed in chunks of 9
    assert passes.chunks() - before == (len(LONG) - 1 - 96 - (MIN_PREFILL_CHUNK + 1)) // 9 + 1


def test_a_caller_that_leaves_is_not_run_again() -> None:
    runs: list[list[str]] = []

    def run_batch(items: list[str]) -> list[object]:
        runs.append(list(items))
        return [NOT_YET if item == "slow" else item.upper() for item in items]

    async def main() -> None:
        batcher: MicroBatcher[str, str] = MicroBatcher(run_batch)  # type: ignore[arg-type]
        slow = asyncio.ensure_future(batcher.submit("slow"))
        assert await batcher.submit("fast") == "FAST"  # answered while "slow" keeps running
        assert not slow.done()
        slow.cancel()
        await asyncio.sleep(0.05)
        count = len(runs)
        await asyncio.sleep(0.05)
        assert len(runs) == count  # not requeued once its caller left
        await batcher.stop()

    run(main())


def test_a_session_that_left_is_not_waited_for() -> None:
    """c=1 after c=2: once the other session released, the lone one's steps run at once
    instead of waiting out the gather window for it (60 s here)."""

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: items, gather_s=60.0)
        assert await asyncio.gather(batcher.submit(1), batcher.submit(2)) == [1, 2]  # last batch: 2
        batcher.leave()  # session 2 released
        started = asyncio.get_running_loop().time()
        for step in range(3):
            assert await batcher.submit(step) == step
        assert asyncio.get_running_loop().time() - started < 5.0
        await batcher.stop()

    run(main())


def test_hf_runner_prefills_in_chunks_too(target_model, draft_model, hf_greedy) -> None:
    """The fallback runner (the model's own forward and cache) takes chunks without logits."""
    runner = HFRunner(target_model)
    passes = Passes(runner)
    t = Tiers(LocalVerifier(TargetWorker(runner, prefill_chunk_tokens=7)), LocalDrafter(DraftWorker(None, "")))
    (result,) = generate_all(t, [request("long", LONG)])
    assert result.token_ids == hf_greedy[tuple(LONG)]
    assert passes.chunks() == (len(LONG) - 1 - (MIN_PREFILL_CHUNK + 1)) // 7 + 1
