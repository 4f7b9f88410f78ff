"""The replica registry in Redis.

Each replica heartbeats `{prefix}replica:{tier}:{replica_id}` = JSON (SET EX ttl): its
address, model and live load. The coordinator routes on it, the operator scales on it,
`specdec status` prints it. A replica that stops reporting expires and disappears.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

log = logging.getLogger(__name__)
TTL_HEARTBEATS = 5


@dataclass
class ReplicaInfo:
    tier: str
    address: str
    model: str = ""
    replica_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)
    heartbeat_at: float = 0.0
    drafters: list[str] = field(default_factory=list)
    load: dict[str, float | int | None] = field(default_factory=dict)
    heartbeat_s: float = 2.0  # the replica's beat: a record older than a few beats is stale

    def key(self, prefix: str) -> str:
        return f"{prefix}replica:{self.tier}:{self.replica_id}"

    def stale(self, now: float) -> bool:
        """Not refreshed for STALE_HEARTBEATS beats (plus slack for clocks a little apart)."""
        return now - self.heartbeat_at > STALE_HEARTBEATS * self.heartbeat_s + CLOCK_SLACK_S

    @classmethod
    def from_json(cls, raw: str | bytes) -> ReplicaInfo:
        """The record, checked field by field; ValueError for anything that is not one."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a replica record is a JSON object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for name, kinds in _FIELD_TYPES.items():
            if name in known and (not isinstance(known[name], kinds) or isinstance(known[name], bool)):
                raise ValueError(f"{name}: {type(known[name]).__name__} is not {kinds}")
        if not known.get("tier") or not known.get("address"):
            raise ValueError("tier and address are required")
        if not all(isinstance(d, str) for d in known.get("drafters", [])):
            raise ValueError("drafters: not a list of strings")
        load = known.get("load", {})
        if not all(isinstance(k, str) and (v is None or isinstance(v, (int, float))) for k, v in load.items()):
            raise ValueError("load: not a map of names to numbers")
        return cls(**known)


STALE_HEARTBEATS = 3
CLOCK_SLACK_S = 2.0
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "tier": str,
    "address": str,
    "model": str,
    "replica_id": str,
    "pid": int,
    "started_at": (int, float),
    "heartbeat_at": (int, float),
    "drafters": list,
    "load": dict,
    "heartbeat_s": (int, float),
}


class Registry:
    def __init__(self, redis_url: str, prefix: str = "specdec:") -> None:
        self.prefix = prefix
        self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    async def publish(self, info: ReplicaInfo, ttl_s: float) -> None:
        info.heartbeat_at = time.time()
        await self.redis.set(info.key(self.prefix), json.dumps(asdict(info)), ex=max(1, int(ttl_s)))

    async def remove(self, info: ReplicaInfo) -> None:
        await self.redis.delete(info.key(self.prefix))

    async def replicas(self, tier: str | None = None) -> list[ReplicaInfo]:
        pattern = f"{self.prefix}replica:{tier or '*'}:*"
        keys = [key async for key in self.redis.scan_iter(match=pattern, count=500)]
        if not keys:
            return []
        values = await self.redis.mget(keys)
        now, found = time.time(), []
        for key, value in zip(keys, values):
            if not value:
                continue  # expired between SCAN and MGET
            try:
                info = ReplicaInfo.from_json(value)
            except (ValueError, TypeError) as exc:  # not ours, or not well formed: skip it, never fail on it
                log.warning("skipping replica record %r: %s", key[:200], str(exc)[:200])
                continue
            if not info.stale(now):
                found.append(info)
        return sorted(found, key=lambda r: (r.tier, r.address))

    async def close(self) -> None:
        await self.redis.aclose()


class Heartbeat:
    """Publishes a replica's record every interval; Redis outages are logged, not fatal."""

    def __init__(
        self,
        registry: Registry,
        info: ReplicaInfo,
        load: Callable[[], dict[str, float | int | None]],
        interval_s: float,
    ) -> None:
        self.registry, self.info, self.load, self.interval_s = registry, info, load, interval_s
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                self.info.load = self.load()
                await self.registry.publish(self.info, self.interval_s * TTL_HEARTBEATS)
                self._warned = False
            except Exception as exc:  # Redis down: keep serving, retry next beat
                if not self._warned:
                    log.warning("registry heartbeat failed: %s", exc)
                    self._warned = True
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(Exception):  # Redis down: the record expires by itself
            await self.registry.remove(self.info)


class IntervalRates:
    """Throughput and acceptance since the previous read, for heartbeat load figures.

    Reads advance the window, so exactly one reader (the heartbeat) should call it."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), 0, 0, 0)

    def read(self, tokens: int, drafted: int, accepted: int) -> dict[str, float | None]:
        """Counters are running totals: committed tokens, draft tokens judged, drafts kept."""
        now = time.monotonic()
        then, tokens0, drafted0, accepted0 = self._last
        self._last = (now, tokens, drafted, accepted)
        judged = drafted - drafted0
        return {
            "tokens_per_s": round((tokens - tokens0) / max(now - then, 1e-6), 2),
            "acceptance_rate": round((accepted - accepted0) / judged, 4) if judged else None,
        }
