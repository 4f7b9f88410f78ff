"""The replica registry record: a replica's address, what it serves, and its live load.

Each replica heartbeats ``Keys.replica(tier, replica_id)`` = ``ReplicaRecord.to_json()``;
the coordinator routes on it, the operator scales on it (``Load``), ``specdec status``
prints it. Both sides go through this one type, so a renamed field breaks the contract
test, not autoscaling in production.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from specdec_records.errors import RecordError, is_a
from specdec_records.keys import TIERS, Keys

MAX_REPLICA_RECORD_BYTES = 64 << 10  # a real one is a few hundred bytes; bounds a forged one
STALE_HEARTBEATS = 3  # a record not refreshed for this many beats is stale
CLOCK_SLACK_S = 2.0  # plus slack for clocks a little apart
Figure = float | int | bool | None  # one extra load figure (kv_* counters, max_batch_size, ...)


@dataclass
class Load:
    """What a replica reports about its load each heartbeat. The named fields are what routing
    and autoscaling read; `extra` holds figures only people read (`specdec status`, tests)."""

    queue_depth: int = 0  # items waiting on this replica (verify / propose items, queued requests)
    active_sessions: int = 0  # sessions this replica holds state for (coordinator: requests running)
    batch_utilization: float = 0.0  # fraction of batch capacity used, 0..1
    tokens_per_s: float = 0.0  # committed (target, coordinator) or drafted (draft) tokens/s since the last beat
    acceptance_rate: float | None = None  # draft tokens accepted / judged since the last beat; None = none judged
    extra: dict[str, Figure] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Figure]:
        """The JSON form: one flat object, the named fields first."""
        named: dict[str, Figure] = {name: getattr(self, name) for name in _LOAD_FIELDS}
        return {**self.extra, **named}

    @classmethod
    def from_dict(cls, data: object) -> Load:
        if not isinstance(data, dict):
            raise RecordError("replica", "load", "not an object")
        missing = [name for name in _LOAD_FIELDS if name not in data]
        if missing:
            raise RecordError("replica", "load", f"missing {missing}")
        for name in ("queue_depth", "active_sessions"):
            if not is_a(data[name], int) or data[name] < 0:
                raise RecordError("replica", f"load.{name}", f"{data[name]!r:.40} is not a count")
        for name in ("batch_utilization", "tokens_per_s"):
            if not _finite(data[name]) or data[name] < 0:
                raise RecordError("replica", f"load.{name}", f"{data[name]!r:.40} is not a number >= 0")
        rate = data["acceptance_rate"]
        if rate is not None and (not _finite(rate) or not 0 <= rate <= 1):
            raise RecordError("replica", "load.acceptance_rate", f"{rate!r:.40} is not null or in [0, 1]")
        extra = {k: v for k, v in data.items() if k not in _LOAD_FIELDS}
        if not all(isinstance(k, str) and (v is None or isinstance(v, int | float)) for k, v in extra.items()):
            raise RecordError("replica", "load", "extra figures are not numbers")
        return cls(
            data["queue_depth"],
            data["active_sessions"],
            float(data["batch_utilization"]),
            float(data["tokens_per_s"]),
            None if rate is None else float(rate),
            extra,
        )


_LOAD_FIELDS = ("queue_depth", "active_sessions", "batch_utilization", "tokens_per_s", "acceptance_rate")


def _finite(value: object) -> bool:
    return is_a(value, (int, float)) and math.isfinite(value)  # type: ignore[arg-type]  # a number by is_a


@dataclass
class ReplicaRecord:
    """One replica as it last reported itself."""

    tier: str  # one of TIERS
    address: str  # host:port the replica serves gRPC on
    model: str = ""  # what it serves (a model name, or the drafter family)
    replica_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)  # unix seconds
    heartbeat_at: float = 0.0  # unix seconds of the write
    drafters: list[str] = field(default_factory=list)  # draft tier: the drafters it serves
    load: Load = field(default_factory=Load)
    heartbeat_s: float = 2.0  # the replica's beat: a record older than a few beats is stale

    def key(self, prefix: str) -> str:
        return Keys(prefix).replica(self.tier, self.replica_id)

    def stale(self, now: float) -> bool:
        """Not refreshed for STALE_HEARTBEATS beats (plus slack for clocks a little apart)."""
        return now - self.heartbeat_at > STALE_HEARTBEATS * self.heartbeat_s + CLOCK_SLACK_S

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in _TYPES}
        out["drafters"] = list(self.drafters)
        out["load"] = self.load.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ReplicaRecord:
        """The record, checked field by field; RecordError for anything that is not one."""
        if len(raw) > MAX_REPLICA_RECORD_BYTES:
            raise RecordError("replica", "(whole)", f"{len(raw)} bytes")
        try:
            data = json.loads(raw)
        except ValueError as exc:  # UnicodeDecodeError included
            raise RecordError("replica", "(whole)", f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RecordError("replica", "(whole)", "not a JSON object")
        missing = [name for name in ("tier", "address", "replica_id", "heartbeat_at", "load") if name not in data]
        if missing:
            raise RecordError("replica", "(whole)", f"missing {missing}")
        for name, kind in _TYPES.items():
            if name in data and not is_a(data[name], kind):
                raise RecordError("replica", name, f"{type(data[name]).__name__} is not {kind}")
        if data["tier"] not in TIERS:
            raise RecordError("replica", "tier", f"{data['tier'][:20]!r} is not one of {TIERS}")
        if not data["address"] or not data["replica_id"]:
            raise RecordError("replica", "address", "address and replica_id must not be empty")
        for name in ("started_at", "heartbeat_at", "heartbeat_s"):
            if name in data and not _finite(data[name]):
                raise RecordError("replica", name, "not a finite number")
        if data.get("heartbeat_s", 1) <= 0:
            raise RecordError("replica", "heartbeat_s", "must be > 0")
        drafters = data.get("drafters", [])
        if not isinstance(drafters, list) or not all(isinstance(d, str) for d in drafters):
            raise RecordError("replica", "drafters", "not a list of strings")
        known = {name: data[name] for name in _TYPES if name in data}
        return cls(**known, drafters=drafters, load=Load.from_dict(data["load"]))


_TYPES: dict[str, type | tuple[type, ...]] = {  # every field but drafters and load, and its JSON type
    "tier": str,
    "address": str,
    "model": str,
    "replica_id": str,
    "pid": int,
    "started_at": (int, float),
    "heartbeat_at": (int, float),
    "heartbeat_s": (int, float),
}
