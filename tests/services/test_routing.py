"""Routing trusts nothing it reads: malformed or stale registry records are skipped, a
replica that accepts TCP and never answers costs one connect timeout once, and sessions
go only to draft replicas that serve their drafter."""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest

from specdec.client import AsyncClient
from specdec.coordinator.remote import RemoteVerifier
from specdec.coordinator.routing import ReplicaPool
from specdec.core.sampling import SamplingParams
from specdec.core.types import VerifyItem
from specdec.rpc.streams import CONNECT_TIMEOUT_S, Dial
from specdec.state.registry import Registry, ReplicaInfo
from specdec.v1 import target_pb2, target_pb2_grpc
from specdec_records import Keys, connect


def _records(now: float) -> dict[str, str]:
    fresh = dict(heartbeat_at=now, heartbeat_s=0.5)
    return {
        "target:notjson": "{not json",
        "target:list": json.dumps([1, 2]),
        "target:loadstring": json.dumps({"tier": "target", "address": "127.0.0.1:9", "load": "busy", **fresh}),
        "draft:draftersint": json.dumps({"tier": "draft", "address": "127.0.0.1:9", "drafters": 5, **fresh}),
        "target:noaddress": json.dumps({"tier": "target", **fresh}),
        "target:stale": json.dumps({"tier": "target", "address": "127.0.0.1:9", "heartbeat_at": now - 600}),
    }


async def test_malformed_and_stale_records_are_skipped(redis_url):
    prefix = f"routing-{uuid.uuid4().hex[:6]}:"
    store = connect(redis_url)
    now = time.time()
    for name, raw in _records(now).items():
        store.set(Keys(prefix).replica(*name.split(":")), raw)
    good = ReplicaInfo(tier="target", address="127.0.0.1:1234", heartbeat_at=now, heartbeat_s=0.5)
    store.set(good.key(prefix), good.to_json())
    registry = Registry(redis_url, prefix)
    try:
        assert [r.address for r in await registry.replicas()] == ["127.0.0.1:1234"]
    finally:
        await registry.close()
        store.close()


async def test_requests_succeed_while_bad_records_sit_in_the_registry(tiny_stack, valkey, prompt_ids, reference):
    store = connect(valkey.url)
    keys = [Keys(tiny_stack.prefix).replica(*name.split(":")) for name in _records(0)]
    for key, raw in zip(keys, _records(time.time()).values()):
        store.set(key, raw, ex=60)
    try:
        async with AsyncClient(tiny_stack.address, timeout_s=60) as client:
            deadline = time.monotonic() + 2.5  # the coordinator re-reads the registry every second
            while time.monotonic() < deadline:
                reply = await client.complete(
                    token_ids=prompt_ids, max_new_tokens=24, ignore_eos=True, drafter="ngram", adaptive=False
                )
                assert list(reply.token_ids) == reference
    finally:
        store.delete(*keys)
        store.close()


@pytest.fixture
def black_hole():
    """An address that accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def test_an_address_that_never_answers_costs_one_connect_timeout_once(tiny_stack, prompt_ids, black_hole):
    target = next(c.address for c in tiny_stack.stack.children if c.name.startswith("target-"))
    pool = ReplicaPool(
        "target",
        None,
        [black_hole, target],
        lambda ch: target_pb2_grpc.TargetServiceStub(ch).Verify(),
        lambda items, rel: target_pb2.VerifyRequest(items=items, release_session_ids=rel),
        Dial(token=tiny_stack.stack.env["SPECDEC_INTERNAL_TOKEN"]),
    )
    verifier = RemoteVerifier(pool, timeout_s=60, max_failovers=2)
    timings = []
    try:
        for _ in range(4):  # new sessions: the least loaded replica is the black hole at first
            item = VerifyItem(uuid.uuid4().hex, 0, prompt_ids, [], None, SamplingParams())
            started = time.monotonic()
            verdict = await verifier.verify(item)
            timings.append(time.monotonic() - started)
            assert verdict.tokens and verdict.replica == target
            await verifier.release(item.session_id)
    finally:
        await pool.close()
    # The first session met the black hole: one connect timeout, not the 60 s call timeout.
    assert CONNECT_TIMEOUT_S * 0.9 < timings[0] < CONNECT_TIMEOUT_S + 5, timings
    assert all(t < CONNECT_TIMEOUT_S for t in timings[1:]), timings  # quarantined: not tried again


async def test_new_sessions_go_to_a_draft_replica_serving_their_drafter(redis_url):
    prefix = f"routing-{uuid.uuid4().hex[:6]}:"
    registry = Registry(redis_url, prefix)
    for address, drafters in (("127.0.0.1:1001", ["ngram", "model:a"]), ("127.0.0.1:1002", ["ngram", "model:b"])):
        await registry.publish(ReplicaInfo(tier="draft", address=address, drafters=drafters), ttl_s=30)
    pool = ReplicaPool("draft", registry, [], lambda ch: None, lambda items, rel: None)
    try:
        for i in range(4):
            assert (await pool.client_for(f"b{i}", "model:b")).address == "127.0.0.1:1002"
            assert (await pool.client_for(f"a{i}", "model:a")).address == "127.0.0.1:1001"
        with pytest.raises(Exception, match="serving 'model:c'"):
            await pool.client_for("c", "model:c")
    finally:
        await pool.close()
        await registry.close()
