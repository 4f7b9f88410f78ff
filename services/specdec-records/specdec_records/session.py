"""Session records: what a coordinator needs to resume or inspect a request.

``Keys.session(record_id)`` holds ``SessionRecord.to_json()`` for SESSION_TTL_S after its
last write; ``Keys.request(request_digest(...))`` holds the record id, so a client resuming
by request_id finds it on any coordinator. Whatever is read back is checked field by field
against the model's limits; a record that is not well formed is a RecordError (a miss).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields

from specdec_records.errors import RecordError, is_a

SESSION_TTL_S = 900  # a finished request answers its request_id again this long; a running one refreshes its record
RECORD_VERSION = 1
STATES = ("queued", "running", "done")
FINISH_REASONS = ("length", "stop", "context")
MAX_RECORD_BYTES = 16 << 20  # far above any real record (a full context of token ids); bounds a forged one
MAX_ID_CHARS = 256


def request_digest(request_id: str, fingerprint: str) -> str:
    """The index key's name for a request: its id and what it asks for."""
    key = json.dumps([request_id, fingerprint]).encode()
    return hashlib.blake2b(key, digest_size=16, person=b"specdec-req-v1").hexdigest()


def _bad(name: str, message: str) -> RecordError:
    return RecordError("session", name, message)


@dataclass
class SessionRecord:
    """One request as a coordinator left it. `generated_ids` are committed tokens (the
    loop's own, cut at stop tokens and the length limit), all of them since the start."""

    request_id: str
    fingerprint: str  # of the request as the caller sent it (input and parameters)
    state: str  # queued | running | done
    prompt_ids: list[int]
    generated_ids: list[int]
    max_new_tokens: int  # of the whole request
    sampling: dict[str, float]  # temperature, top_k, top_p, seed (the one used, drawn or given)
    drafter: str
    max_draft_tokens: int
    adaptive: bool
    overlap: bool
    stop: list[str]  # stop strings
    stop_token_ids: list[int]  # EOS included unless ignore_eos
    tier_session_id: str = ""  # the session id the tiers hold this request's state under
    finish_reason: str | None = None  # when done
    stats: dict[str, float] = field(default_factory=dict)  # SpecStats counters so far
    placement: dict[str, str] = field(default_factory=dict)  # tier -> replica address
    owner: str = ""  # the coordinator that wrote it
    updated_at: float = 0.0
    v: int = RECORD_VERSION

    def to_json(self) -> str:
        # Not dataclasses.asdict: its deep copy costs ten times the encoding, once a chunk.
        return json.dumps({name: getattr(self, name) for name in _FIELDS}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes, vocab_size: int, max_context: int) -> SessionRecord:
        """The record, checked field by field against the model's limits; RecordError for
        anything that is not one (never a crash on what Redis hands back)."""
        if len(raw) > MAX_RECORD_BYTES:
            raise _bad("(whole)", f"{len(raw)} bytes")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise _bad("(whole)", f"not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("v") != RECORD_VERSION:
            raise _bad("v", f"not a version-{RECORD_VERSION} session record")
        missing = [f for f in _REQUIRED if f not in data]
        if missing:
            raise _bad("(whole)", f"missing {missing}")
        known = {k: v for k, v in data.items() if k in _TYPES}
        for name, kind in _TYPES.items():
            if name in known and known[name] is not None and not is_a(known[name], kind):
                raise _bad(name, f"{type(known[name]).__name__} is not {kind}")
        record = cls(**known)
        record._check(vocab_size, max_context)
        return record

    def _check(self, vocab_size: int, max_context: int) -> None:
        if self.state not in STATES:
            raise _bad("state", f"{self.state[:20]!r}")
        if not 0 < len(self.request_id) <= MAX_ID_CHARS or len(self.tier_session_id) > MAX_ID_CHARS:
            raise _bad("request_id", "request_id or tier_session_id length")
        for name in ("prompt_ids", "generated_ids", "stop_token_ids"):
            ids = getattr(self, name)
            if not all(is_a(t, int) and 0 <= t < vocab_size for t in ids):
                raise _bad(name, "not token ids of this model")
        if not self.prompt_ids:
            raise _bad("prompt_ids", "empty prompt")
        if self.max_new_tokens < 1 or len(self.generated_ids) > self.max_new_tokens:
            raise _bad("max_new_tokens", f"{len(self.generated_ids)} tokens generated of {self.max_new_tokens}")
        if len(self.prompt_ids) + len(self.generated_ids) > max_context:
            raise _bad("prompt_ids", "longer than the model's context")
        if set(self.sampling) != {"temperature", "top_k", "top_p", "seed"}:
            raise _bad("sampling", "fields")
        if not all(is_a(v, (int, float)) and math.isfinite(v) for v in self.sampling.values()):
            raise _bad("sampling", "values")
        if not all(is_a(s, str) for s in self.stop):
            raise _bad("stop", "not strings")
        if self.state == "done" and self.finish_reason not in FINISH_REASONS:
            raise _bad("finish_reason", f"{str(self.finish_reason)[:20]!r}")
        if not all(is_a(k, str) and is_a(v, (int, float)) for k, v in self.stats.items()):
            raise _bad("stats", "not a map of names to numbers")
        if not all(is_a(k, str) and is_a(v, str) for k, v in self.placement.items()):
            raise _bad("placement", "not a map of tiers to addresses")


_FIELDS = tuple(f.name for f in fields(SessionRecord))
_REQUIRED = (
    "request_id",
    "fingerprint",
    "state",
    "prompt_ids",
    "generated_ids",
    "max_new_tokens",
    "sampling",
    "drafter",
    "max_draft_tokens",
    "adaptive",
    "overlap",
    "stop",
    "stop_token_ids",
)
_TYPES: dict[str, type | tuple[type, ...]] = {
    "request_id": str,
    "fingerprint": str,
    "state": str,
    "prompt_ids": list,
    "generated_ids": list,
    "max_new_tokens": int,
    "sampling": dict,
    "drafter": str,
    "max_draft_tokens": int,
    "adaptive": bool,
    "overlap": bool,
    "stop": list,
    "stop_token_ids": list,
    "tier_session_id": str,
    "finish_reason": str,
    "stats": dict,
    "placement": dict,
    "owner": str,
    "updated_at": (int, float),
    "v": int,
}
assert set(_TYPES) == set(_FIELDS), "every field has a JSON type"
