"""The registry records real tiers publish are what the operator reads: every tier of a
running stack (target, draft, coordinator) is found by the operator's load reader, and
the registry refuses to publish a record its readers would skip."""

from __future__ import annotations

import uuid

import pytest

from specdec.state.registry import IntervalRates, Registry
from specdec_operator.load import read_loads
from specdec_records import Load, RecordError, ReplicaRecord, connect_async


async def test_the_operator_reads_every_live_tier(tiny_stack, valkey) -> None:
    client = connect_async(valkey.url)
    try:
        loads = await read_loads(client, tiny_stack.prefix)
    finally:
        await client.aclose()
    assert all(loads[tier] for tier in ("coordinator", "draft", "target")), loads


async def test_a_record_readers_would_skip_is_never_published(redis_url: str) -> None:
    registry = Registry(redis_url, f"live-{uuid.uuid4().hex[:6]}:")
    try:
        bad = ReplicaRecord("target", "127.0.0.1:1", load=Load(tokens_per_s=-1.0))
        with pytest.raises(RecordError, match=r"load\.tokens_per_s"):
            await registry.publish(bad, ttl_s=5)
        assert await registry.replicas() == []
    finally:
        await registry.close()


def test_interval_rates_stay_publishable_when_a_counter_goes_back() -> None:
    rates = IntervalRates()
    rates.read(100, 10, 8)
    back = rates.read(5, 20, 2)  # counters reset: fewer tokens and accepted drafts than before
    assert back.tokens_per_s == 0 and back.acceptance_rate == 0.0
    assert rates.read(5, 20, 2).acceptance_rate is None  # nothing judged in the interval
