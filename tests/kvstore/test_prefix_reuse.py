"""Prefix reuse across replicas, real processes: a 1,000+ token prefix computed on one target
replica is restored from Redis by another one (counted in its registry load), and the time
to first token falls; the `prefix-bench` figure measured side by side."""

from __future__ import annotations

import random
import socket
import urllib.request

from specdec.client import Client
from specdec_records import Keys, connect
from tests.conftest import free_port
from tests.kvstore.conftest import add_replica, child, load_of, start, wait_restored
from tests.waiting import wait_until

PREFIX, SUFFIX, CHUNK = 1024, 16, 256


def ttft(client: Client, prompt: list[int]) -> float:
    reply = client.complete(token_ids=prompt, max_new_tokens=2, ignore_eos=True, drafter="none")
    assert len(reply.token_ids) == 2
    return reply.stats.ttft_ms / 1e3


def wait_chunks(stack, at_least: int) -> None:
    client = connect(stack.redis_url)
    try:
        wait_until(
            lambda: sum(1 for _ in client.scan_iter(Keys(stack.prefix).kv_chunks("target"))) >= at_least,
            timeout_s=10,
            what="the prefix's chunks to be written",
        )
    finally:
        client.close()


def two_free_ports() -> int:
    """A port p with p + 1 free too: the launcher gives the coordinator p and target-0 p + 1."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def routable_targets(metrics_port: int) -> float:
    """The target replicas the coordinator would route a new session to now (its
    `specdec_replicas` gauge: the registry as it last read it, less quarantined ones)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    (value,) = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("specdec_replicas{") and 'tier="target"' in line
    ]
    return value


def test_second_replica_reuses_a_long_prefix_from_redis(wide_model, valkey):
    rng = random.Random(7)
    ids = lambda n: [rng.randrange(1000, 30000) for _ in range(n)]
    shared, fresh = ids(PREFIX), ids(PREFIX)
    metrics_port = two_free_ports()  # the coordinator's scrape endpoint shows its routing view
    stack = start(wide_model, "none", valkey, targets=1, drafts=0, SPECDEC_METRICS_PORT=str(metrics_port))
    try:
        with Client(stack.coordinator, timeout_s=300) as client:
            ttft(client, ids(64))  # warm-up of replica A
            ttft(client, shared + ids(SUFFIX))  # replica A computes the prefix and writes its chunks
            wait_chunks(stack, PREFIX // CHUNK)
            second = add_replica(stack, "target", "target-1", SPECDEC_METRICS_PORT="0")
            first = child(stack, "target-0")
            first.proc.terminate()  # drain A: from now on only replica B serves
            assert first.proc.wait(timeout=30) == 0

            # Warm up replica B until the coordinator routes to it alone. After a request A is
            # either gone from its view (re-read from the registry at most once a second) or,
            # if that request was sent to A and failed over, quarantined: either way the
            # gauge reads 1 only once A gets no more sessions.
            def warm_up_b_alone() -> bool:
                ttft(client, ids(64))
                return routable_targets(metrics_port) == 1

            wait_until(warm_up_b_alone, timeout_s=60, interval_s=0, what="the coordinator to route to B alone")
            recomputed = [ttft(client, fresh + ids(SUFFIX))]  # same length, nothing in Redis
            restored = [ttft(client, shared + ids(SUFFIX))]  # the prefix replica A computed
            recomputed.append(ttft(client, ids(PREFIX + SUFFIX)))
        wait_restored(stack, second, PREFIX)
        load = load_of(stack, second)
    finally:
        stack.stop()
    print(
        f"\n[prefix reuse] TTFT recomputed {recomputed} s, from Redis {restored} s, "
        f"ratio {restored[0] / min(recomputed):.3f}"
    )
    assert load["kv_restored_tokens"] >= PREFIX and load["kv_hit_chunks"] >= PREFIX // CHUNK, load
    assert restored[0] < min(recomputed)


def test_prefix_bench_reports_the_ratio(wide_model, valkey):
    from specdec.benchmarks.prefix_bench import prefix_bench

    result = prefix_bench(
        wide_model,
        prefix_tokens=PREFIX,
        suffix_tokens=SUFFIX,
        rounds=3,
        chunk_tokens=CHUNK,
        redis_url=valkey.url,
        extra_env={"SPECDEC_TORCH_THREADS": "1"},
    )
    print(
        f"\n[prefix-bench] {result['ttft_from_redis_s']} s from Redis / {result['ttft_recomputed_s']} s "
        f"recomputed = {result['ratio']}"
    )
    assert len(result["samples"]["from_redis_s"]) == 3
    assert result["ratio"] < 0.8
