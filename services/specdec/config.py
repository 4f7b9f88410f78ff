"""All settings in one typed place. Every field can be overridden by the environment
variable SPECDEC_<FIELD> (upper case) and then by command-line flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_PORTS = {"coordinator": 50051, "draft": 50052, "target": 50053}


@dataclass
class Settings:
    model: str = "smollm2-135m"  # target model: alias, HF directory or hub id
    drafter: str = "ngram"  # default drafter: none | ngram | model:NAME
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | float16 | bfloat16
    host: str = "127.0.0.1"  # bind address
    port: int = 0  # 0 = the tier's default port
    advertise_host: str = ""  # address other processes use to reach this one (default: host)
    redis_url: str = ""  # empty = run without Redis (static addresses only)
    redis_prefix: str = "specdec:"  # key namespace, one per deployment
    kv_redis_url: str = ""  # KV chunks' own server (allkeys-lru); empty = the one at redis_url
    draft_addresses: list[str] = field(default_factory=list)  # static replicas (no Redis)
    target_addresses: list[str] = field(default_factory=list)
    max_batch_size: int = 32  # sequences per verify/draft forward pass
    max_sessions: int = 1024  # per replica; least recently used are evicted (and recomputed)
    # per replica: session caches beyond this are evicted, LRU; 0 = 30% of RAM / half the free GPU memory
    session_idle_s: float = 600.0  # per replica: a session unused this long is dropped (its coordinator is gone)
    kv_budget_mb: float = 0.0
    max_new_tokens: int = 4096  # cap on one request
    max_request_bytes: int = 4 << 20  # coordinator: largest request message (gRPC answers RESOURCE_EXHAUSTED)
    max_running_requests: int = 256  # coordinator: requests run at once; the rest queue (queue_depth)
    max_queued_requests: int = 1024  # coordinator: beyond this many queued, RESOURCE_EXHAUSTED with a retry hint
    torch_threads: int = 0  # 0 = torch's default
    heartbeat_s: float = 2.0  # registry refresh; entries expire after 5 heartbeats
    tier_timeout_s: float = 60.0  # a draft/verify call slower than this counts as a failure
    max_failovers: int = 4  # replica switches per call before giving up
    overlap: bool = False  # default for requests: pre-draft step n+1 while step n is verified
    metrics_port: int = 0  # Prometheus scrape endpoint (/metrics) on host:port; 0 = off
    http_port: int = 0  # coordinator: OpenAI-compatible HTTP API (/v1/...) on host:port; 0 = off
    kv_chunk_tokens: int = 256  # tokens per KV chunk in Redis (prefix reuse, failover); 0 = no KV in Redis
    tls_cert_file: str = ""  # PEM certificate of this process (server; the coordinator also presents it to the tiers)
    tls_key_file: str = ""  # its key; with cert: TLS on every port this process serves and dials
    tls_ca_file: str = ""  # CA that signs peers' certificates (mTLS); re-read with the others when they change
    tls_client_auth: bool = True  # with TLS: clients must present a certificate the CA signed
    api_keys_file: str = ""  # coordinator: SHA-256 hex digests of accepted API keys, one a line (empty: no keys)
    api_key_max_calls: int = 0  # coordinator: concurrent calls per API key (0 = no limit)
    internal_token: str = ""  # without TLS: the token tiers require from coordinators (empty: none)
    reflection: bool = False  # gRPC reflection on the internal tiers (the coordinator always has it)
    kv_secret: str = ""  # shared by the tiers: KV chunks carry a keyed MAC with it (`specdec up` makes one)
    kv_ttl_s: float = 3600.0  # lifetime of a KV chunk in Redis (Redis's maxmemory policy may evict sooner)
    kv_max_pending_mb: int = 256  # KV chunks waiting to be written per replica; beyond that they are dropped
    watchdog_s: float = 120.0  # a compute thread on one batch this long: NOT_SERVING, out of the registry; 0 = off
    drain_timeout_s: float = 10.0  # SIGTERM: time for in-flight items and KV writes before exiting
    prefill_chunk_s: float = 0.25  # target: a pass's time budget for prompt chunks (chunked prefill); 0 = one pass
    prefill_chunk_tokens: int = 0  # target: a fixed prompt chunk size instead of the budget's (0 = from the budget)
    kv_fork_tokens: int = 32  # target, draft: a new session copies a prompt prefix this long another holds; 0 = off

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}  # each of its field's type (parsed, or the caller's)
        for f in fields(cls):
            raw = env.get(f"SPECDEC_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f.type, raw, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def port_for(self, tier: str) -> int:
        return self.port or DEFAULT_PORTS[tier]


def _parse(kind: object, raw: str, name: str) -> object:
    try:
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (bool, "bool"):
            if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError("expected true or false")
            return raw.lower() in ("1", "true", "yes", "on")
        if str(kind).startswith("list"):
            return [part.strip() for part in raw.split(",") if part.strip()]
        return raw
    except ValueError as exc:
        raise ValueError(f"SPECDEC_{name.upper()}={raw!r}: {exc}") from exc
