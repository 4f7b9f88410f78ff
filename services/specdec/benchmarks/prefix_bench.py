"""Prefix reuse through the Redis KV tier: time to first token with a long shared prefix
restored from Redis ÷ the same prefix recomputed, measured side by side in one run.

Starts Valkey + target replica(s) + a coordinator (no drafter: the first verify is the
prefill). Each round sends a fresh random prefix of `prefix_tokens` with a short suffix
(recomputed: nothing in Redis has it), then the same prefix with another suffix (restored:
the chunks the first request wrote). Rounds alternate, so drift hits both sides alike.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any


def _wait_stored(redis_url: str, prefix: str, tier: str, at_least: int, timeout_s: float = 10.0) -> None:
    from specdec_records import Keys, connect

    client = connect(redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(1 for _ in client.scan_iter(Keys(prefix).kv_chunks(tier), count=1000)) >= at_least:
                return
            time.sleep(0.02)
    finally:
        client.close()


def prefix_bench(
    model: str = "smollm2-135m",
    prefix_tokens: int = 1024,
    suffix_tokens: int = 16,
    rounds: int = 5,
    chunk_tokens: int = 256,
    target_replicas: int = 1,
    redis_url: str = "",
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the comparison on a fresh local stack; returns medians, ratio and every sample."""
    import uuid

    from specdec.client import Client
    from specdec.launcher import free_port, start_stack

    key_prefix = f"specdec-prefixbench-{uuid.uuid4().hex[:6]}:"
    env = {"SPECDEC_REDIS_PREFIX": key_prefix, "SPECDEC_KV_CHUNK_TOKENS": str(chunk_tokens), **(extra_env or {})}
    stack = start_stack(model, "none", 0, target_replicas, free_port(), redis_url, extra_env=env)
    rng = random.Random(1234)

    def ids(n: int) -> list[int]:
        return [rng.randrange(1000, 30000) for _ in range(n)]

    def ttft(client: Client, prompt: list[int]) -> float:
        reply = client.complete(token_ids=prompt, max_new_tokens=1, ignore_eos=True, drafter="none")
        return reply.stats.ttft_ms / 1e3

    samples: dict[str, list[float]] = {"recomputed_s": [], "from_redis_s": []}
    try:
        with Client(stack.coordinator, timeout_s=600) as client:
            per_request = (prefix_tokens + suffix_tokens) // chunk_tokens  # chunks each new prompt writes
            ttft(client, ids(prefix_tokens + suffix_tokens))  # warm-up: first-call costs on every path
            stored = per_request
            for _ in range(rounds):
                shared = ids(prefix_tokens)
                samples["recomputed_s"].append(ttft(client, shared + ids(suffix_tokens)))
                stored += per_request
                _wait_stored(stack.kv_redis_url, key_prefix, "target", stored)  # written off the hot path
                samples["from_redis_s"].append(ttft(client, shared + ids(suffix_tokens)))
    finally:
        stack.stop()
    recomputed, restored = statistics.median(samples["recomputed_s"]), statistics.median(samples["from_redis_s"])
    return {
        "model": model,
        "prefix_tokens": prefix_tokens,
        "suffix_tokens": suffix_tokens,
        "chunk_tokens": chunk_tokens,
        "rounds": rounds,
        "ttft_recomputed_s": round(recomputed, 4),
        "ttft_from_redis_s": round(restored, 4),
        "ratio": round(restored / recomputed, 4),
        "samples": samples,
    }
