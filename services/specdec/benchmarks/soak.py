"""`specdec soak`: a long run at steady load that must leave nothing behind.

Starts the local stack (Valkey, target, draft, coordinator), keeps `streams` greedy
generations in flight for `minutes`, and reports each process's RSS after a warm-up and
at the end, the sessions every tier still holds once the load stops, the Redis keys left,
and the errors, GOAWAYs and failovers seen. Passes when every process grew less than
`max_growth` (a fraction), no session or key leaked, and no request failed.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

GOAWAY_MARKERS = ("too_many_pings", "GOAWAY")
FAILOVER_MARKERS = ("failing over", "reconnected")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _held(redis_url: str, prefix: str) -> tuple[dict[str, int], int]:
    """(sessions each tier reports holding, keys that would never expire). Session records
    and KV chunks carry a TTL; a key without one is a leak."""
    from specdec_records import Keys, ReplicaRecord, connect

    client, keys = connect(redis_url), Keys(prefix)
    try:
        held: dict[str, int] = {}
        for key in client.scan_iter(keys.replicas()):
            raw = client.get(key)
            if raw is None:
                continue  # expired meanwhile
            record = ReplicaRecord.from_json(raw)  # a malformed one here is a finding: let it raise
            held[record.tier] = held.get(record.tier, 0) + record.load.active_sessions
        forever = sum(1 for key in client.scan_iter(keys.everything()) if client.ttl(key) == -1)
        return held, forever
    finally:
        client.close()


async def _load(address: str, streams: int, seconds: float, prompts: list[str]) -> dict[str, int]:
    from specdec.client import AsyncClient

    counts = {"requests": 0, "failed": 0, "tokens": 0}
    deadline = time.monotonic() + seconds
    rng = random.Random(7)

    async def worker(client: AsyncClient) -> None:
        while time.monotonic() < deadline:
            try:
                reply = await client.complete(
                    rng.choice(prompts), max_new_tokens=rng.choice([16, 32, 64]), drafter=rng.choice(["ngram", "none"])
                )
                counts["tokens"] += reply.stats.generated_tokens
            except Exception:
                counts["failed"] += 1
            counts["requests"] += 1

    async with AsyncClient(address, timeout_s=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(streams)))
    return counts


def soak(
    model: str = "smollm2-135m",
    streams: int = 64,
    minutes: float = 10.0,
    warmup_s: float = 60.0,
    max_growth: float = 0.10,
) -> dict[str, Any]:
    import uuid

    from specdec.benchmarks.bench import DEFAULT_PROMPTS, load_prompts
    from specdec.launcher import free_port, start_stack

    prompts = [row["prompt"] for row in load_prompts(DEFAULT_PROMPTS) if "prompt" in row] or ["Hello"]
    prefix = f"specdec-soak-{uuid.uuid4().hex[:6]}:"
    stack = start_stack(model, "ngram", 1, 1, free_port(), extra_env={"SPECDEC_REDIS_PREFIX": prefix})
    try:
        processes = {c.name: c for c in stack.children if not c.name.startswith("valkey")}
        warm = asyncio.run(_load(stack.coordinator, streams, warmup_s, prompts))
        before = {name: rss_mb(c.proc.pid) for name, c in processes.items()}
        main = asyncio.run(_load(stack.coordinator, streams, minutes * 60, prompts))
        after = {name: rss_mb(c.proc.pid) for name, c in processes.items()}
        time.sleep(5)  # two heartbeats: the tiers report what they hold once idle
        held, keys_forever = _held(stack.redis_url, prefix)
        logs = {name: c.log.read_text(errors="replace") for name, c in processes.items()}
    finally:
        stack.stop()
    growth = {name: round(after[name] / before[name] - 1, 4) for name in before}
    result = {
        "streams": streams,
        "minutes": minutes,
        "warmup": warm,
        "run": main,
        "rss_mb_after_warmup": {k: round(v, 1) for k, v in before.items()},
        "rss_mb_at_end": {k: round(v, 1) for k, v in after.items()},
        "rss_growth": growth,
        "sessions_held_after": held,
        "redis_keys_without_ttl": keys_forever,
        "goaways": sum(log.count(m) for log in logs.values() for m in GOAWAY_MARKERS),
        "failovers": sum(log.count(m) for log in logs.values() for m in FAILOVER_MARKERS),
    }
    result["passed"] = (
        all(g < max_growth for g in growth.values())
        and not any(held.values())
        and not keys_forever
        and main["failed"] == 0
        and result["goaways"] == 0
    )
    return result
