"""The operator's load reader: the services' registry record, read through the shared
record type from a real Valkey; whatever is not a well-formed, fresh record of the tier it
is filed under is skipped, never fatal."""

from __future__ import annotations

import json
import time
import uuid

from specdec_operator.load import read_loads, replica_load
from specdec_records import Keys, Load, ReplicaRecord, connect, connect_async


def test_parses_the_services_heartbeat() -> None:
    raw = (
        '{"tier": "draft", "replica_id": "d-1", "address": "10.0.0.1:50052", '
        '"pid": 7, "model": "m", "started_at": 1.0, "heartbeat_at": 2.0, '
        '"load": {"queue_depth": 3, "active_sessions": 2, "batch_utilization": 0.5, '
        '"tokens_per_s": 120.5, "acceptance_rate": null}}'
    )
    x = replica_load(ReplicaRecord.from_json(raw))
    assert (x.tier, x.replica_id, x.queue_depth, x.active_sessions, x.acceptance_rate) == ("draft", "d-1", 3, 2, None)
    assert x.batch_utilization == 0.5 and x.tokens_per_s == 120.5 and x.heartbeat_at == 2.0


async def test_bad_stale_and_misfiled_records_are_skipped(redis_url: str) -> None:
    keys, now = Keys(f"op-{uuid.uuid4().hex[:6]}:"), time.time()
    good = ReplicaRecord("target", "10.0.0.1:1", replica_id="good", heartbeat_at=now, load=Load(queue_depth=4))
    fields = good.to_dict()
    bad = {
        "notjson": "{not json",
        "list": "[1, 2]",
        "loadstring": json.dumps({**fields, "load": "busy"}),
        "queuestring": json.dumps({**fields, "load": {**fields["load"], "queue_depth": "4"}}),
        "renamed": json.dumps({**fields, "load": {"queue_len": 4, **dict.fromkeys(("active_sessions",), 0)}}),
        "drafterint": json.dumps({**fields, "drafters": 5}),
        "noaddress": json.dumps({k: v for k, v in fields.items() if k != "address"}),
        "misfiled": json.dumps({**fields, "tier": "draft"}),
        "stale": json.dumps({**fields, "heartbeat_at": now - 600}),
    }
    sync = connect(redis_url)
    sync.set(keys.replica("target", "good"), good.to_json())
    for name, raw in bad.items():
        sync.set(keys.replica("target", name), raw)
    sync.close()
    client = connect_async(redis_url)
    try:
        loads = await read_loads(client, keys.prefix, max_age_s=10, now=now)
    finally:
        await client.aclose()
    assert [(x.replica_id, x.queue_depth) for x in loads["target"]] == [("good", 4)]
    assert loads["draft"] == [] and loads["coordinator"] == []
