"""Prefix reuse across replicas, real processes: a 1,000+ token prefix computed on one target
replica is restored from Redis by another one (counted in its registry load), and the time
to first token falls; the `prefix-bench` figure measured side by side."""
from __future__ import annotations

import random
import time

import redis

from specdec.client import Client
from tests.kvstore.conftest import add_replica, child, start
from tests.kvstore.test_failover import wait_for_load

PREFIX, SUFFIX, CHUNK = 1024, 16, 256


def ttft(client: Client, prompt: list[int]) -> float:
    reply = client.complete(token_ids=prompt, max_new_tokens=2, ignore_eos=True, drafter="none")
    assert len(reply.token_ids) == 2
    return reply.stats.ttft_ms / 1e3


def wait_chunks(stack, at_least: int) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    deadline = time.monotonic() + 10
    while sum(1 for _ in client.scan_iter(f"{stack.prefix}kv:target:*")) < at_least:
        assert time.monotonic() < deadline, "chunks were never written"
        time.sleep(0.05)
    client.close()


def test_second_replica_reuses_a_long_prefix_from_redis(wide_model, valkey):
    rng = random.Random(7)
    ids = lambda n: [rng.randrange(1000, 30000) for _ in range(n)]  # noqa: E731
    shared, fresh = ids(PREFIX), ids(PREFIX)
    stack = start(wide_model, "none", valkey, targets=1, drafts=0)
    try:
        with Client(stack.coordinator, timeout_s=300) as client:
            ttft(client, ids(64))  # warm-up of replica A
            ttft(client, shared + ids(SUFFIX))  # replica A computes the prefix and writes its chunks
            wait_chunks(stack, PREFIX // CHUNK)
            add_replica(stack, "target", "target-1")
            first = child(stack, "target-0")
            first.proc.terminate()  # drain A: from now on only replica B serves
            assert first.proc.wait(timeout=30) == 0
            time.sleep(1.5)  # the coordinator's registry view refreshes every second
            ttft(client, ids(64))  # warm-up of replica B
            recomputed = [ttft(client, fresh + ids(SUFFIX))]  # same length, nothing in Redis
            restored = [ttft(client, shared + ids(SUFFIX))]  # the prefix replica A computed
            recomputed.append(ttft(client, ids(PREFIX + SUFFIX)))
        load = wait_for_load(stack, "target-1", "kv_restored_tokens")
    finally:
        stack.stop()
    print(f"\n[prefix reuse] TTFT recomputed {recomputed} s, from Redis {restored} s, "
          f"ratio {restored[0] / min(recomputed):.3f}")
    assert load["kv_restored_tokens"] >= PREFIX and load["kv_hit_chunks"] >= PREFIX // CHUNK, load
    assert restored[0] < min(recomputed)


def test_prefix_bench_reports_the_ratio(wide_model, valkey):
    from specdec.prefix_bench import prefix_bench

    result = prefix_bench(wide_model, prefix_tokens=PREFIX, suffix_tokens=SUFFIX, rounds=3, chunk_tokens=CHUNK,
                          redis_url=valkey.url, extra_env={"SPECDEC_TORCH_THREADS": "1"})
    print(f"\n[prefix-bench] {result['ttft_from_redis_s']} s from Redis / {result['ttft_recomputed_s']} s "
          f"recomputed = {result['ratio']}")
    assert len(result["samples"]["from_redis_s"]) == 3
    assert result["ratio"] < 0.8
