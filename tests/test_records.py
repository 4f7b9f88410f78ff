"""The Redis contract (specdec_records): key names, records that validate on read, the
connector's options, and the one test that fails when the producer of the registry record
(a tier's heartbeat) and its consumer (the operator's load reader) disagree."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

import pytest

from specdec.state.registry import Heartbeat, Registry
from specdec_operator.load import read_loads
from specdec_operator.policy import ReplicaLoad
from specdec_records import Keys, Load, RecordError, RedisTls, ReplicaRecord, connect, connect_async, redact
from specdec_records.connect import KV, connection_options

# Every value distinct, none a default: a field read from the wrong place cannot pass.
LOAD = Load(
    queue_depth=3,
    active_sessions=5,
    batch_utilization=0.625,
    tokens_per_s=41.5,
    acceptance_rate=0.75,
    extra={"kv_hit_chunks": 9, "kv_available": True},
)


async def test_the_operator_reads_what_a_tier_heartbeat_writes(redis_url: str) -> None:
    """Producer and consumer as they run: a tier's Heartbeat publishes through the Registry
    into a real Valkey, the operator's read_loads reads it back; every figure autoscaling
    uses arrives under its own name."""
    prefix = f"contract-{uuid.uuid4().hex[:6]}:"
    registry = Registry(redis_url, prefix)
    info = ReplicaRecord(tier="target", address="127.0.0.1:1", model="m", heartbeat_s=0.05)
    beat = Heartbeat(registry, info, lambda: LOAD, interval_s=0.05)
    reader = connect_async(redis_url)
    beat.start()
    try:
        loads = await _wait_for_load(reader, prefix)
    finally:
        await beat.stop()
        await reader.aclose()
        await registry.close()
    (got,) = loads["target"]
    assert (got.tier, got.replica_id) == ("target", info.replica_id)
    assert abs(got.heartbeat_at - time.time()) < 30
    scaled_on = {f.name for f in dataclasses.fields(ReplicaLoad)} - {"tier", "replica_id", "heartbeat_at"}
    published = {f.name for f in dataclasses.fields(Load)} - {"extra"}
    assert scaled_on == published, "the operator scales on a figure no tier publishes (or the reverse)"
    for name in scaled_on:
        assert getattr(got, name) == getattr(LOAD, name), name


async def _wait_for_load(reader, prefix: str) -> dict[str, list[ReplicaLoad]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        loads = await read_loads(reader, prefix)
        if loads["target"]:
            return loads
        await asyncio.sleep(0.05)
    raise AssertionError("the heartbeat never reached the operator's reader")


def test_a_replica_record_round_trips() -> None:
    record = ReplicaRecord("draft", "10.0.0.2:5", "tiny", drafters=["ngram", "model:x"], heartbeat_at=5.0, load=LOAD)
    assert ReplicaRecord.from_json(record.to_json()) == record
    assert json.loads(record.to_json())["load"]["queue_depth"] == 3  # flat: figures beside the named ones


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda d: d.update(load="busy"), "load"),
        (lambda d: d["load"].pop("queue_depth"), "load"),
        (lambda d: d["load"].update(queue_depth=True), "load.queue_depth"),
        (lambda d: d["load"].update(active_sessions=-1), "load.active_sessions"),
        (lambda d: d["load"].update(tokens_per_s="fast"), "load.tokens_per_s"),
        (lambda d: d["load"].update(acceptance_rate=1.5), "load.acceptance_rate"),
        (lambda d: d["load"].update(kv_hit_chunks="many"), "load"),
        (lambda d: d.update(drafters=5), "drafters"),
        (lambda d: d.update(tier="mystery"), "tier"),
        (lambda d: d.pop("address"), "(whole)"),
        (lambda d: d.update(pid="7"), "pid"),
        (lambda d: d.update(heartbeat_s=0), "heartbeat_s"),
    ],
)
def test_a_malformed_replica_record_is_a_record_error_naming_the_field(change, field: str) -> None:
    data = ReplicaRecord("target", "10.0.0.1:1", heartbeat_at=1.0, load=LOAD).to_dict()
    change(data)
    with pytest.raises(RecordError) as caught:
        ReplicaRecord.from_json(json.dumps(data))
    assert caught.value.field == field
    for raw in (b"\xff", b"[]", b"{not json", b"x" * (1 << 20)):
        with pytest.raises(RecordError):
            ReplicaRecord.from_json(raw)


def test_keys_and_patterns() -> None:
    keys = Keys("ns:")
    assert keys.replica("draft", "r1") == "ns:replica:draft:r1"
    assert (
        keys.session("s") == "ns:session:s" and keys.request("d") == "ns:request:d" and keys.lease("d") == "ns:lease:d"
    )
    assert keys.kv_chunk("target", "ab") == "ns:kv:target:ab"
    assert keys.replicas() == "ns:replica:*:*" and keys.replicas("target") == "ns:replica:target:*"
    # A prefix with glob characters matches only itself (not every deployment's keys).
    assert Keys("a*[b]:").replicas("target") == "a\\*\\[b\\]:replica:target:*"


def test_scan_patterns_match_their_keys_only(redis_url: str) -> None:
    client, keys, other = connect(redis_url), Keys("p*:"), Keys("px:")
    try:
        client.set(keys.replica("target", "a"), "1")
        client.set(other.replica("target", "b"), "1")
        client.set(keys.kv_chunk("target", "c"), "1")
        assert [k.decode() for k in client.scan_iter(keys.replicas("target"))] == [keys.replica("target", "a")]
        assert [k.decode() for k in client.scan_iter(keys.kv_chunks("target"))] == [keys.kv_chunk("target", "c")]
    finally:
        client.close()


def test_connection_options(tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a connection opens")
    assert connection_options("redis://:pw@h:1/0", KV, RedisTls(str(ca))) == {
        "socket_timeout": 1.0,
        "socket_connect_timeout": 0.5,
    }  # TLS files apply to rediss:// only
    options = connection_options("rediss://u:pw@h:1/0", KV, RedisTls(str(ca)))
    assert options["ssl_ca_certs"] == str(ca) and options["ssl_cert_reqs"] == "required"
    assert options["ssl_check_hostname"] is True
    with pytest.raises(ValueError, match="scheme"):
        connection_options("http://u:secret@h:1", KV)
    with pytest.raises(ValueError, match="SPECDEC_REDIS_CA"):
        connection_options("rediss://h:1", KV, RedisTls(str(tmp_path / "missing.pem")))
    with pytest.raises(ValueError, match="together"):
        RedisTls(cert_file=str(ca))
    assert RedisTls.from_env({"SPECDEC_REDIS_CA": "/ca"}) == RedisTls("/ca")


def test_redact_hides_the_password_only() -> None:
    assert redact("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("rediss://user:s3cret@h:6379/1") == "rediss://user:***@h:6379/1"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"
    with pytest.raises(ValueError) as caught:
        connection_options("ftp://:s3cret@h", KV)
    assert "s3cret" not in str(caught.value)
