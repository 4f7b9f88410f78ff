"""Clients that go away leave nothing behind: 50 streams dropped at once (before, during
and after their first chunk) leave no session on any tier within 5 s."""

from __future__ import annotations

import asyncio
import time

import redis

from specdec.client import AsyncClient
from specdec_records import Keys, ReplicaRecord, connect


def _sessions(store: redis.Redis, prefix: str) -> dict[str, int]:
    """Sessions held per tier, from the load every replica heartbeats (every 0.5 s here)."""
    held: dict[str, int] = {}
    for key in store.scan_iter(Keys(prefix).replicas()):
        raw = store.get(key)
        if raw is not None:  # else expired meanwhile
            record = ReplicaRecord.from_json(raw)
            held[record.tier] = held.get(record.tier, 0) + record.load.active_sessions
    return held


async def _drop(client: AsyncClient, prompt_ids: list[int], chunks: int) -> None:
    """Open a stream and walk away after `chunks` chunks (0: before the first)."""
    stream = client.generate(token_ids=prompt_ids, max_new_tokens=400, ignore_eos=True, drafter="ngram")
    seen = 0
    async for event in stream:
        if event.HasField("chunk"):
            seen += 1
        if seen >= chunks:
            break
    await stream.aclose()


async def test_fifty_clients_that_disconnect_at_once_leave_no_session(tiny_stack, valkey, prompt_ids):
    store = connect(valkey.url)
    before = _sessions(store, tiny_stack.prefix)
    clients = [AsyncClient(tiny_stack.address, timeout_s=60) for _ in range(50)]
    try:
        drops = [
            asyncio.wait_for(_drop(c, prompt_ids, i % 3), 0.05 if i % 3 == 0 else 60) for i, c in enumerate(clients)
        ]
        await asyncio.gather(*drops, return_exceptions=True)  # the first third time out: dropped mid-call
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    deadline = time.monotonic() + 5 + 1.0  # 5 s, plus one heartbeat to report it
    while (after := _sessions(store, tiny_stack.prefix)) != before and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # the count lives in Redis: read it until it settles
    store.close()
    assert after == before, (before, after)
