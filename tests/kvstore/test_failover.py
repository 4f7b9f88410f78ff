"""Failover that loses nothing, with real processes: 20+ concurrent greedy streams survive a
kill -9 of a target or a draft replica, a SIGTERM drain and a Valkey restart, each output
token-identical to plain decoding; the replica that takes over restores from Redis."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import pytest
import torch

from specdec.client import AsyncClient
from specdec_records import Keys, connect
from tests.kvstore.conftest import add_replica, log_count, restored_tokens, start, wait_restored
from tests.reference import hf_greedy
from tests.waiting import wait_until

NUM_REQUESTS = 20
NEW_TOKENS = 40
CHUNK = 32


@pytest.fixture(scope="module")
def stack(kv_models, valkey):
    running = start(
        kv_models["target"],
        f"model:{kv_models['draft']}",
        valkey,
        targets=2,
        drafts=2,
        SPECDEC_KV_CHUNK_TOKENS=str(CHUNK),
        # Each verify step 30 ms slower: a fast machine would otherwise finish every stream
        # (they step in lockstep) before the fault could strike mid-stream.
        SPECDEC_FAILPOINTS="verify_batch=sleep@30",
    )
    yield running
    running.stop()


def live(stack, tier: str) -> list:
    """The tier's replicas still running, oldest first."""
    return [c for c in stack.children if c.name.startswith(f"{tier}-") and c.proc.poll() is None]


def replicas(stack, valkey, targets: int, drafts: int) -> None:
    """Bring the module's stack to what a test needs, whichever tests ran before it: Valkey up
    and at least this many live replicas of each tier (a new one for each killed before)."""
    if valkey.proc is None:  # a Valkey restart that failed half way
        valkey.start()
    for tier, want in (("target", targets), ("draft", drafts)):
        while len(live(stack, tier)) < want:
            started = sum(1 for c in stack.children if c.name.startswith(f"{tier}-"))
            add_replica(stack, tier, f"{tier}-{started}")


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
    all_streaming = asyncio.Event()

    async def one(i: int, prompt: list[int]) -> list[int]:
        ids: list[int] = []
        async for event in client.generate(
            token_ids=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, drafter=drafter, k=3, adaptive=False
        ):
            if event.HasField("chunk"):
                ids.extend(event.chunk.token_ids)
                times[i].append(time.perf_counter())
                progress[i] = len(ids)
                if min(progress) > 0:
                    all_streaming.set()
        return ids

    async with AsyncClient(address, timeout_s=180) as client:
        tasks = [asyncio.create_task(one(i, p)) for i, (p, _) in enumerate(workload)]
        streaming = asyncio.create_task(all_streaming.wait())
        await asyncio.wait([streaming, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if not streaming.done():  # a stream ended before every one had started
            streaming.cancel()
            await asyncio.gather(*tasks)  # raises what failed
        assert max(progress) < NEW_TOKENS, "a stream finished before the fault: nothing would be tested"
        fault_at = time.perf_counter()
        await asyncio.to_thread(fault)
        outputs = await asyncio.gather(*tasks)
    stall = max(b - a for ts in times for a, b in zip(ts, ts[1:]) if b > fault_at)
    return outputs, fault_at, stall


def report(name: str, stall: float) -> None:
    print(f"\n[{name}] longest gap between chunks a client saw after the fault: {stall:.3f} s")


async def test_kill_target_replica_mid_stream(stack, workload, valkey):
    replicas(stack, valkey, targets=2, drafts=1)
    victim, survivor = live(stack, "target")[:2]  # the older one: surely in the coordinator's view
    before = restored_tokens(stack, survivor)
    outputs, _, stall = await run_with_fault(stack.coordinator, workload, "ngram", victim.proc.kill)
    report("kill -9 target", stall)
    assert [o for o in outputs] == [ref for _, ref in workload]
    assert victim.proc.wait(timeout=10) == -signal.SIGKILL
    restored = wait_restored(stack, survivor, before + CHUNK)
    assert restored - before >= CHUNK, f"the surviving replica recomputed everything: {restored - before} restored"


async def test_kill_draft_replica_mid_stream(stack, workload, kv_models, valkey):
    replicas(stack, valkey, targets=1, drafts=2)
    victim, survivor = live(stack, "draft")[:2]
    before = restored_tokens(stack, survivor)
    outputs, _, stall = await run_with_fault(
        stack.coordinator, workload, f"model:{kv_models['draft']}", victim.proc.kill
    )
    report("kill -9 draft", stall)
    assert outputs == [ref for _, ref in workload]
    victim.proc.wait(timeout=10)
    restored = wait_restored(stack, survivor, before + CHUNK)
    assert restored - before >= CHUNK, f"the surviving draft replica recomputed everything: {restored - before}"


async def test_sigterm_drains_a_target_replica_without_failing_a_request(stack, workload, valkey):
    replicas(stack, valkey, targets=2, drafts=1)
    victim = live(stack, "target")[0]
    outputs, _, stall = await run_with_fault(stack.coordinator, workload, "ngram", victim.proc.terminate)
    report("SIGTERM target", stall)
    assert outputs == [ref for _, ref in workload]
    assert victim.proc.wait(timeout=30) == 0, "the drained replica did not exit cleanly"
    log = victim.log.read_text(errors="replace")
    assert "Traceback" not in log


async def test_valkey_restart_during_generation(stack, workload, valkey):
    replicas(stack, valkey, targets=1, drafts=1)
    serving = [c for c in stack.children if c.name != "valkey" and c.proc.poll() is None]
    warned = {c.name: log_count(c, "registry heartbeat failed") for c in serving}

    def restart() -> None:
        valkey.stop()
        try:  # down until every tier process has seen it (a failed heartbeat, every 0.5 s)
            wait_until(
                lambda: all(log_count(c, "registry heartbeat failed") > warned[c.name] for c in serving),
                timeout_s=30,
                what="every tier to notice that Valkey is down",
            )
        finally:
            valkey.start()

    outputs, _, stall = await run_with_fault(stack.coordinator, workload, "ngram", restart)
    report("Valkey restart", stall)
    assert outputs == [ref for _, ref in workload]
    # The KV tier comes back by itself: new prefixes are written to the restarted server again.
    client = connect(stack.redis_url)

    def chunks_written() -> bool:
        return any(True for _ in client.scan_iter(Keys(stack.prefix).kv_chunks("target")))

    deadline, seed = time.monotonic() + 30, 0
    async with AsyncClient(stack.coordinator, timeout_s=60) as generation:
        while not chunks_written():
            assert time.monotonic() < deadline, "KV chunks are no longer written after the restart"
            seed += 1
            prompt = [
                int(t) for t in torch.randint(200, 20000, (3 * CHUNK,), generator=torch.Generator().manual_seed(seed))
            ]
            await generation.complete(token_ids=prompt, max_new_tokens=2, ignore_eos=True, drafter="ngram")
            with contextlib.suppress(AssertionError):  # written off the hot path: look a while, then try again
                await asyncio.to_thread(wait_until, chunks_written, 1.0)
    client.close()
