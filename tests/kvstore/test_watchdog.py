"""A replica whose compute thread is stuck goes NOT_SERVING and leaves the registry; its
streams finish on another replica, token-identical to plain decoding."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.client import AsyncClient
from tests.kvstore.conftest import add_replica, registered, start
from tests.reference import hf_greedy

NEW_TOKENS = 40
STREAMS = 10


@pytest.fixture(scope="module")
def frozen_stack(kv_models, valkey):
    running = start(kv_models["target"], "ngram", valkey, targets=1, drafts=1)
    # The second target freezes for good in its 15th verify batch; its watchdog notices in 1 s.
    frozen = add_replica(
        running, "target", "target-frozen", SPECDEC_FAILPOINTS="verify_batch=freeze@15", SPECDEC_WATCHDOG_S="1"
    )
    yield running, frozen
    running.stop()


@pytest.fixture(scope="module")
def workload(kv_models) -> list[tuple[list[int], list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(kv_models["target"], dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(5)
    prompts = [[int(t) for t in torch.randint(200, 20000, (60 + 10 * i,), generator=gen)] for i in range(STREAMS)]
    return [(p, hf_greedy(model, p, NEW_TOKENS)) for p in prompts]


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


async def test_a_stuck_replica_goes_not_serving_and_its_streams_finish_elsewhere(frozen_stack, workload):
    stack, frozen = frozen_stack
    gaps: list[float] = []

    async def one(client: AsyncClient, prompt: list[int]) -> list[int]:
        ids, last = [], time.perf_counter()
        async for event in client.generate(
            token_ids=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, drafter="ngram", k=3, adaptive=False
        ):
            if event.HasField("chunk"):
                ids.extend(event.chunk.token_ids)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
        return ids

    async with AsyncClient(stack.coordinator, timeout_s=120) as client:
        outputs = await asyncio.wait_for(asyncio.gather(*(one(client, p) for p, _ in workload)), 120)
    assert [o for o in outputs] == [ref for _, ref in workload]
    assert await _health(frozen.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert registered(stack, frozen.address) is None  # out of the registry: no new traffic
    assert "compute thread stuck" in frozen.log.read_text(errors="replace")  # it did freeze mid-run
    print(f"\n[watchdog] longest gap between chunks a client saw: {max(gaps):.2f} s")
