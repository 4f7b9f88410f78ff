"""The replica registry in Redis.

Each replica heartbeats its :class:`~specdec_records.ReplicaRecord` under
``Keys.replica(tier, replica_id)`` (SET EX ttl): its address, model and live :class:`Load`.
The coordinator routes on it, the operator scales on it, `specdec status` prints it. A
replica that stops reporting expires and disappears. The record type and key names live in
`specdec_records`, shared with the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from specdec_records import Keys, Load, RecordError, ReplicaRecord, connect_async

__all__ = ["TTL_HEARTBEATS", "Heartbeat", "IntervalRates", "Load", "Rates", "Registry", "ReplicaInfo", "ReplicaRecord"]
log = logging.getLogger(__name__)
TTL_HEARTBEATS = 5
ReplicaInfo = ReplicaRecord  # the name the services have used


class Registry:
    def __init__(self, redis_url: str, prefix: str = "specdec:") -> None:
        self.prefix, self.keys = prefix, Keys(prefix)
        self.redis = connect_async(redis_url)

    async def publish(self, info: ReplicaRecord, ttl_s: float) -> None:
        """Write the record; RecordError (nothing written) for one its readers would skip."""
        info.heartbeat_at = time.time()
        raw = info.to_json()
        ReplicaRecord.from_json(raw)  # checked as every reader checks it: a bad figure is said here, once a beat
        await self.redis.set(self.keys.replica(info.tier, info.replica_id), raw, ex=max(1, int(ttl_s)))

    async def remove(self, info: ReplicaRecord) -> None:
        await self.redis.delete(self.keys.replica(info.tier, info.replica_id))

    async def replicas(self, tier: str | None = None) -> list[ReplicaRecord]:
        keys = [key async for key in self.redis.scan_iter(match=self.keys.replicas(tier), count=500)]
        if not keys:
            return []
        values = await self.redis.mget(keys)
        now, found = time.time(), []
        for key, value in zip(keys, values):
            if not value:
                continue  # expired between SCAN and MGET
            try:
                info = ReplicaRecord.from_json(value)
            except RecordError as exc:  # not ours, or not well formed: skip it, never fail on it
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
        info: ReplicaRecord,
        load: Callable[[], Load],
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


@dataclass(frozen=True)
class Rates:
    """Throughput and acceptance over one heartbeat interval (the `Load` fields of that name)."""

    tokens_per_s: float
    acceptance_rate: float | None  # None: no draft token judged in the interval


class IntervalRates:
    """Throughput and acceptance since the previous read, for heartbeat load figures.

    Reads advance the window, so exactly one reader (the heartbeat) should call it."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), 0, 0, 0)

    def read(self, tokens: int, drafted: int, accepted: int) -> Rates:
        """Counters are running totals: committed tokens, draft tokens judged, drafts kept."""
        now = time.monotonic()
        then, tokens0, drafted0, accepted0 = self._last
        self._last = (now, tokens, drafted, accepted)
        judged = drafted - drafted0
        # Clamped: a counter that went back (a reset) must not publish a figure readers refuse.
        return Rates(
            round(max(0, tokens - tokens0) / max(now - then, 1e-6), 2),
            round(min(1.0, max(0.0, (accepted - accepted0) / judged)), 4) if judged > 0 else None,
        )
