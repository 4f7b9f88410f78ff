"""Prompt affinity: new sessions with the prompt of one placed a moment ago go to its
replica (where they fork its KV, core/kv_fork.py), within a bound on imbalance; other
sessions still go to the least loaded replica."""

from __future__ import annotations

from collections import Counter

import pytest

from specdec.coordinator import routing
from specdec.coordinator.routing import ReplicaPool

REPLICAS = ["127.0.0.1:1001", "127.0.0.1:1002"]


def _pool() -> ReplicaPool:
    return ReplicaPool("target", None, list(REPLICAS), lambda ch: None, lambda items, rel: None)


async def test_siblings_share_a_replica_and_others_balance() -> None:
    pool = _pool()
    prompt, other = list(range(40)), list(range(100, 140))
    try:
        first = (await pool.client_for("c0", prompt=prompt)).address
        siblings = [(await pool.client_for(f"c{j}", prompt=prompt)).address for j in range(1, 4)]
        assert siblings == [first] * 3
        # another prompt, and short prompts (not worth forking), balance as before
        assert (await pool.client_for("o", prompt=other)).address != first
        short = [(await pool.client_for(f"s{j}", prompt=list(range(10)))).address for j in range(4)]
        assert short.count(next(a for a in REPLICAS if a != first)) >= 3  # the least loaded
        # a session keeps its replica, whatever prompt it is sent with later
        assert (await pool.client_for("o", prompt=prompt)).address != first
    finally:
        await pool.close()


async def test_affinity_yields_to_balance_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = _pool()
    prompt = list(range(40))
    try:
        first = (await pool.client_for("c0", prompt=prompt)).address
        placed = [(await pool.client_for(f"c{j}", prompt=prompt)).address for j in range(1, 20)]
        assert placed[: routing.AFFINITY_SKEW] == [first] * routing.AFFINITY_SKEW
        # past the skew the other replica takes the next one, and the prompt's affinity with it
        other = next(a for a in REPLICAS if a != first)
        assert placed[routing.AFFINITY_SKEW :] == [other] * (19 - routing.AFFINITY_SKEW)
        monkeypatch.setattr(routing, "AFFINITY_S", 0.0)  # remembered too long ago: the least loaded again
        for j in range(6):
            await pool.client_for(f"l{j}", prompt=prompt)
        assert sorted(Counter(pool.placement.values()).values()) == [13, 13]
    finally:
        await pool.close()
