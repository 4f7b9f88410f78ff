"""Read the replicas' published load from Redis.

Each replica writes ``{prefix}replica:{tier}:{replica_id}`` (a JSON heartbeat) every 2 s
with a 10 s expiry; a replica that stops reporting simply disappears. Heartbeats older
than ``max_age_s`` are ignored as well (a clock-skewed or stuck writer).
"""

from __future__ import annotations

import json
import logging
import time

import redis.asyncio as aioredis

from .policy import TIERS, ReplicaLoad

log = logging.getLogger(__name__)


async def read_loads(
    client: aioredis.Redis, prefix: str, max_age_s: float = 10.0, now: float | None = None
) -> dict[str, list[ReplicaLoad]]:
    """Live heartbeats per tier; malformed entries are skipped with a warning."""
    now = time.time() if now is None else now
    out: dict[str, list[ReplicaLoad]] = {tier: [] for tier in TIERS}
    for tier in TIERS:
        keys = [k async for k in client.scan_iter(match=f"{prefix}replica:{tier}:*", count=200)]
        if not keys:
            continue
        for key, raw in zip(keys, await client.mget(keys)):
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                load = ReplicaLoad.from_json(json.loads(raw))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring malformed heartbeat %r: %s", key, exc)
                continue
            if load.heartbeat_at and now - load.heartbeat_at > max_age_s:
                continue
            out[tier].append(load)
    return out
