"""Failover that loses nothing, with real processes: 20+ concurrent greedy streams survive a
kill -9 of a target or a draft replica, a SIGTERM drain and a Valkey restart, each output
token-identical to plain decoding; the replica that takes over restores from Redis."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
import redis
import torch

from specdec.client import AsyncClient
from tests.kvstore.conftest import add_replica, child, start
from tests.reference import hf_greedy

NUM_REQUESTS = 20
NEW_TOKENS = 40
CHUNK = 32


@pytest.fixture(scope="module")
def stack(kv_models, valkey):
    running = start(kv_models["target"], f"model:{kv_models['draft']}", valkey, targets=2, drafts=2,
                    SPECDEC_KV_CHUNK_TOKENS=str(CHUNK))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def workload(kv_models) -> list[tuple[list[int], list[int]]]:
    """(prompt, plain greedy continuation) per request: 5 distinct prompts of 100-220 tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(kv_models["target"], dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(11)
    distinct = []
    for length in (100, 130, 160, 190, 220):
        prompt = [int(t) for t in torch.randint(200, 20000, (length,), generator=gen)]
        distinct.append((prompt, hf_greedy(model, prompt, NEW_TOKENS)))
    return [distinct[i % len(distinct)] for i in range(NUM_REQUESTS)]


async def run_with_fault(address: str, workload, drafter: str, fault) -> tuple[list[list[int]], float, float]:
    """Run every request concurrently; call `fault()` (in a thread) once each has streamed its
    first tokens. Returns the outputs, the fault time and the longest gap a stream saw."""
    progress = [0] * len(workload)
    times: list[list[float]] = [[] for _ in workload]

    async def one(i: int, prompt: list[int]) -> list[int]:
        ids: list[int] = []
        async for event in client.generate(token_ids=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True,
                                           drafter=drafter, k=3, adaptive=False):
            if event.HasField("chunk"):
                ids.extend(event.chunk.token_ids)
                times[i].append(time.perf_counter())
                progress[i] = len(ids)
        return ids

    async with AsyncClient(address, timeout_s=180) as client:
        tasks = [asyncio.create_task(one(i, p)) for i, (p, _) in enumerate(workload)]
        while min(progress) < 1:
            if any(task.done() for task in tasks):
                await asyncio.gather(*tasks)  # raises what failed
            await asyncio.sleep(0.005)
        assert max(progress) < NEW_TOKENS, "a stream finished before the fault: nothing would be tested"
        fault_at = time.perf_counter()
        await asyncio.to_thread(fault)
        outputs = await asyncio.gather(*tasks)
    stall = max(b - a for ts in times for a, b in zip(ts, ts[1:]) if b > fault_at)
    return outputs, fault_at, stall


def replica_load(stack, name: str) -> dict:
    """The registry entry's load of one replica (as the coordinator and operator see it)."""
    address = child(stack, name).address
    client = redis.Redis.from_url(stack.redis_url)
    try:
        for key in client.scan_iter(f"{stack.prefix}replica:*"):
            raw = client.get(key)
            if raw and json.loads(raw)["address"] == address:
                return json.loads(raw)["load"]
    finally:
        client.close()
    raise AssertionError(f"{name} is not registered")


def wait_for_load(stack, name: str, key: str, timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            load = replica_load(stack, name)
        except AssertionError:  # not (re-)registered yet
            if time.monotonic() > deadline:
                raise
            load = {}
        if load.get(key) or time.monotonic() > deadline:
            return load
        time.sleep(0.2)


def report(name: str, stall: float) -> None:
    print(f"\n[{name}] longest gap between chunks a client saw after the fault: {stall:.3f} s")


async def test_kill_target_replica_mid_stream(stack, workload):
    victim = child(stack, "target-0")
    outputs, _, stall = await run_with_fault(stack.coordinator, workload, "ngram", victim.proc.kill)
    report("kill -9 target", stall)
    assert [o for o in outputs] == [ref for _, ref in workload]
    assert victim.proc.wait(timeout=10) == -signal.SIGKILL
    load = wait_for_load(stack, "target-1", "kv_restored_tokens")
    assert load["kv_restored_tokens"] >= CHUNK, f"the surviving replica recomputed everything: {load}"
    add_replica(stack, "target", "target-2")  # two targets again for the drain test


async def test_kill_draft_replica_mid_stream(stack, workload, kv_models):
    victim = child(stack, "draft-0")
    outputs, _, stall = await run_with_fault(stack.coordinator, workload, f"model:{kv_models['draft']}",
                                             victim.proc.kill)
    report("kill -9 draft", stall)
    assert outputs == [ref for _, ref in workload]
    victim.proc.wait(timeout=10)
    load = wait_for_load(stack, "draft-1", "kv_restored_tokens")
    assert load["kv_restored_tokens"] >= CHUNK, f"the surviving draft replica recomputed everything: {load}"


async def test_sigterm_drains_a_target_replica_without_failing_a_request(stack, workload):
    victim = child(stack, "target-1")
    outputs, _, stall = await run_with_fault(stack.coordinator, workload, "ngram", victim.proc.terminate)
    report("SIGTERM target", stall)
    assert outputs == [ref for _, ref in workload]
    assert victim.proc.wait(timeout=30) == 0, "the drained replica did not exit cleanly"
    log = victim.log.read_text(errors="replace")
    assert "Traceback" not in log


async def test_valkey_restart_during_generation(stack, workload, valkey):
    def restart() -> None:
        valkey.stop()
        time.sleep(1.0)
        valkey.start()

    outputs, _, stall = await run_with_fault(stack.coordinator, workload, "ngram", restart)
    report("Valkey restart", stall)
    assert outputs == [ref for _, ref in workload]
    # The KV tier comes back by itself: new prefixes are written to the restarted server again.
    client = redis.Redis.from_url(stack.redis_url)
    deadline, seed = time.monotonic() + 30, 0
    async with AsyncClient(stack.coordinator, timeout_s=60) as generation:
        while not any(True for _ in client.scan_iter(f"{stack.prefix}kv:target:*")):
            assert time.monotonic() < deadline, "KV chunks are no longer written after the restart"
            seed += 1
            prompt = [int(t) for t in torch.randint(200, 20000, (3 * CHUNK,), generator=torch.Generator().manual_seed(seed))]
            await generation.complete(token_ids=prompt, max_new_tokens=2, ignore_eos=True, drafter="ngram")
            await asyncio.sleep(0.5)
    client.close()
