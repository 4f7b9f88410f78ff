"""Every torch computation of a process runs on its one compute thread (core.compute), and
moving draft probabilities through the wire format keeps them bit-identical."""

from __future__ import annotations

import asyncio
import threading

import torch
from tiny_models import IdTokenizer, build_draft, build_target, run

from specdec.core import compute
from specdec.core.engine import Engine
from specdec.core.request import RequestSpec
from specdec.core.sampling import SamplingParams, probs_from_logits, quantize_f16
from specdec.rpc.convert import probs_from_bytes, probs_to_bytes


def test_run_sync_runs_on_the_compute_thread_and_nests_inline() -> None:
    def where() -> tuple[int, bool]:
        return threading.get_ident(), compute.on_compute_thread()

    ident, on = compute.run_sync(where)
    assert on and ident != threading.get_ident()
    assert not compute.on_compute_thread()
    # Called from the compute thread itself it runs inline instead of deadlocking.
    assert compute.run_sync(lambda: compute.run_sync(where)) == (ident, True)


def test_engine_forward_passes_all_run_on_the_compute_thread() -> None:
    target = build_target()
    engine = Engine(
        target, IdTokenizer(), drafter="model:small", draft_model=build_draft(target), draft_model_name="small"
    )
    threads: set[int] = set()
    for runner in (engine.verifier.worker.runner, engine.drafter.worker.methods["model:small"].runner):
        forward = runner.forward

        def recorded(items, forward=forward):
            threads.add(threading.get_ident())
            return forward(items)

        runner.forward = recorded

    async def main() -> list[list[int]]:
        try:
            specs = [
                RequestSpec(token_ids=[1 + i, 2, 3], max_new_tokens=12, temperature=0.9, seed=i, overlap=True)
                for i in range(4)
            ]
            return [r.token_ids for r in await asyncio.gather(*(engine.complete_async(s) for s in specs))]
        finally:
            await engine.aclose()

    outputs = run(main())
    assert all(len(out) == 12 for out in outputs)
    assert threads == {compute.run_sync(threading.get_ident)}


def test_draft_probabilities_survive_two_wire_hops_bit_for_bit() -> None:
    # draft tier -> coordinator -> target tier: each end rebuilds q from the float16 bytes.
    torch.manual_seed(0)
    for params in (
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.3, top_k=40, top_p=0.9, seed=2),
    ):
        q = quantize_f16(probs_from_logits(torch.randn(5, 1000) * 4, params))
        hop1 = probs_from_bytes(probs_to_bytes(q), 5)
        hop2 = probs_from_bytes(probs_to_bytes(hop1), 5)
        assert hop1.dtype == torch.float64 and torch.equal(hop1, q) and torch.equal(hop2, q)
    assert probs_from_bytes(probs_to_bytes(None), 0) is None
