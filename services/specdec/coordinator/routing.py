"""Replica pools: which replicas of a tier exist, and which one a session should use.

Replicas come from the Redis registry (refreshed at most once a second, last good list
kept if Redis is down) or from static addresses. A session sticks to its replica (that is
where its cache is); new sessions go to the replica with the least work in flight among
those that serve what the session needs (a draft replica lists its drafters). A replica
whose stream broke and that does not answer a reconnect is quarantined, longer each time
it fails again in a row.

Prompt affinity: a new session whose prompt starts like one placed in the last
AFFINITY_S seconds goes to that session's replica (unless it already holds AFFINITY_SKEW
more sessions than the least loaded one), so the n choices of one request, and requests
sent together with one long prompt, share the prompt's KV there (core/kv_fork.py: forking
happens only within a replica).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from specdec.core.errors import TierUnavailable
from specdec.rpc.streams import Dial, TaggedStreamClient
from specdec.state.registry import Registry, ReplicaInfo

log = logging.getLogger(__name__)
REFRESH_S = 1.0
QUARANTINE_S = 15.0  # the first time; doubled for each further failure in a row
MAX_QUARANTINE_S = 300.0
EMPTY_GRACE_S = 15.0  # an empty registry right after replicas were seen is a restarted Redis, not a dead tier
AFFINITY_TOKENS = 32  # prompts this long or longer, keyed by these first tokens (core/kv_fork.py forks >= 32 rows)
AFFINITY_S = 2.0  # how long a prompt's replica is remembered (siblings arrive together)
AFFINITY_SKEW = 8  # sessions more than the least loaded replica beyond which affinity yields to balance
MAX_AFFINITY_KEYS = 1024


class ReplicaPool:
    def __init__(
        self,
        tier: str,
        registry: Registry | None,
        static: list[str],
        open_stream: Callable[[Any], Any],
        make_request: Callable[[list[Any], list[str]], Any],
        dial: Dial | None = None,
    ) -> None:
        self.tier, self.registry, self.static, self.dial = tier, registry, static, dial
        self._open_stream, self._make_request = open_stream, make_request
        self._known: list[ReplicaInfo] = [ReplicaInfo(tier=tier, address=a) for a in static]
        self._refreshed = 0.0
        self._seen_at = 0.0  # when the registry last listed any replica
        self._refreshing: asyncio.Future[None] | None = None
        self._clients: dict[str, TaggedStreamClient] = {}
        self._quarantine: dict[str, float] = {}
        self._failures: Counter[str] = Counter()  # failures in a row, per address
        self.placement: dict[str, str] = {}  # session id -> address
        self._affinity: OrderedDict[tuple[int, ...], tuple[str, float]] = OrderedDict()  # prompt key -> (address, when)

    async def replicas(self) -> list[ReplicaInfo]:
        if self.registry is not None and time.monotonic() - self._refreshed > REFRESH_S:
            self._refreshed = time.monotonic()
            self._refreshing = asyncio.ensure_future(self._refresh(self.registry))
        if self._refreshing is not None and not self._refreshing.done():
            # Concurrent callers share the refresh in flight (none routes on a list it lacks).
            await asyncio.shield(self._refreshing)
        now = time.monotonic()
        return [r for r in self._known if self._quarantine.get(r.address, 0) < now]

    def healthy_count(self) -> int:
        """Replicas last seen and not quarantined (no registry read: safe in a metrics callback)."""
        now = time.monotonic()
        return sum(1 for r in self._known if self._quarantine.get(r.address, 0) < now)

    async def _refresh(self, registry: Registry) -> None:
        try:
            fresh = await registry.replicas(self.tier)
            if fresh:
                self._known, self._seen_at = fresh, time.monotonic()
            elif time.monotonic() - self._seen_at > EMPTY_GRACE_S:
                self._known = self._known_static()
            # else: Redis came back empty (restarted); replicas re-register at their next beat
        except Exception as exc:  # Redis down: route on what we knew
            log.debug("registry read failed: %s", exc)

    def _known_static(self) -> list[ReplicaInfo]:
        return [ReplicaInfo(tier=self.tier, address=a) for a in self.static]

    async def client_for(
        self, session_id: str, serves: str | None = None, prompt: list[int] | None = None
    ) -> TaggedStreamClient:
        """The session's replica; a new session's is the least loaded one that `serves` it,
        or the replica of a recent session with the same `prompt` start (module doc)."""
        address = self.placement.get(session_id)
        if address is None or self._quarantine.get(address, 0) > time.monotonic():
            key = tuple(prompt[:AFFINITY_TOKENS]) if prompt is not None and len(prompt) > AFFINITY_TOKENS else None
            address = await self._least_loaded(serves, key)
            self.placement[session_id] = address
            if key is not None:
                self._affinity.pop(key, None)
                self._affinity[key] = (address, time.monotonic())
                while len(self._affinity) > MAX_AFFINITY_KEYS:
                    self._affinity.popitem(last=False)
        return self._client(address)

    async def _least_loaded(self, serves: str | None, key: tuple[int, ...] | None = None) -> str:
        replicas = self._serving(await self.replicas(), serves)
        if not replicas and self.registry is not None:  # all we knew failed: ask now, not in a second
            self._refreshed = 0.0
            replicas = self._serving(await self.replicas(), serves)
        if not replicas:
            what = f" serving {serves[:100]!r}" if serves else ""
            raise TierUnavailable(self.tier, f"no healthy replica{what} registered")

        placed = Counter(self.placement.values())  # sessions stick: count them, not only calls in flight

        def score(r: ReplicaInfo) -> tuple[int, int, float]:
            client = self._clients.get(r.address)
            return (placed[r.address], client.in_flight if client else 0, float(r.load.queue_depth))

        least = min(replicas, key=score).address
        near, when = self._affinity.get(key, ("", 0.0)) if key is not None else ("", 0.0)
        recent = bool(near) and time.monotonic() - when < AFFINITY_S
        healthy = any(r.address == near for r in replicas)  # and serving what the session needs
        return near if recent and healthy and placed[near] <= placed[least] + AFFINITY_SKEW else least

    def _client(self, address: str) -> TaggedStreamClient:
        client = self._clients.get(address)
        if client is None or client.failed is not None:
            client = TaggedStreamClient(address, self._open_stream, self._make_request, self.dial)
            self._clients[address] = client
        return client

    @staticmethod
    def _serving(replicas: list[ReplicaInfo], serves: str | None) -> list[ReplicaInfo]:
        """Replicas that list `serves`; static ones list nothing and are taken on trust."""
        return [r for r in replicas if serves is None or not r.drafters or serves in r.drafters]

    async def reconnects(self, address: str) -> bool:
        """Whether a replica whose stream broke answers a new connection and says SERVING
        (the stream broke on a GOAWAY or a transient error): then its sessions stay where
        their state is. A stuck, draining or dead replica does not."""
        return await self._client(address).serving()

    def mark_ok(self, address: str) -> None:
        if address in self._failures:
            del self._failures[address]

    def mark_failed(self, address: str) -> None:
        self._failures[address] += 1
        quarantine = min(QUARANTINE_S * 2 ** (self._failures[address] - 1), MAX_QUARANTINE_S)
        self._quarantine[address] = time.monotonic() + quarantine
        self.placement = {s: a for s, a in self.placement.items() if a != address}

    def release(self, session_id: str) -> None:
        """Tell the session's replica to free it, over a fresh stream if the old one broke
        (a dropped release would hold the session's cache until the replica evicts it)."""
        address = self.placement.pop(session_id, None)
        if address is None or self._quarantine.get(address, 0) > time.monotonic():
            return  # no replica, or a failed one: nothing there to free, or nobody to tell
        self._client(address).release(session_id)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
