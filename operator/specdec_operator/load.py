"""Read the replicas' published load from Redis.

Each replica writes its :class:`~specdec_records.ReplicaRecord` under
``Keys.replica(tier, replica_id)`` every heartbeat with an expiry of a few beats; a replica
that stops reporting simply disappears. Heartbeats older than ``max_age_s`` are ignored as
well (a clock-skewed or stuck writer). The record type is the one the services write with,
so the two cannot disagree about a field's name.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis

from specdec_records import Keys, RecordError, ReplicaRecord

from .policy import TIERS, ReplicaLoad

log = logging.getLogger(__name__)


def replica_load(record: ReplicaRecord) -> ReplicaLoad:
    """What autoscaling reads of a replica record."""
    load = record.load
    return ReplicaLoad(
        tier=record.tier,
        replica_id=record.replica_id,
        queue_depth=load.queue_depth,
        active_sessions=load.active_sessions,
        batch_utilization=load.batch_utilization,
        tokens_per_s=load.tokens_per_s,
        acceptance_rate=load.acceptance_rate,
        heartbeat_at=record.heartbeat_at,
    )


async def read_loads(
    client: aioredis.Redis, prefix: str, max_age_s: float = 10.0, now: float | None = None
) -> dict[str, list[ReplicaLoad]]:
    """Live heartbeats per tier; malformed entries are skipped with a warning."""
    now = time.time() if now is None else now
    keys_of = Keys(prefix)
    out: dict[str, list[ReplicaLoad]] = {tier: [] for tier in TIERS}
    for tier in TIERS:
        keys = [k async for k in client.scan_iter(match=keys_of.replicas(tier), count=200)]
        if not keys:
            continue
        for key, raw in zip(keys, await client.mget(keys)):
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                record = ReplicaRecord.from_json(raw)
                if record.tier != tier:
                    raise RecordError("replica", "tier", f"{record.tier!r} under a {tier} key")
            except RecordError as exc:
                log.warning("ignoring malformed heartbeat %r: %s", key[:200], str(exc)[:200])
                continue
            if record.heartbeat_at and now - record.heartbeat_at > max_age_s:
                continue
            out[tier].append(replica_load(record))
    return out
