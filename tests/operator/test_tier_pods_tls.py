"""The tier pods the operator renders for the chart's secure values, run for real.

Certificates are issued (trustme) with exactly the names and common names of the chart's
cert-manager ``Certificate`` objects; the Secret volumes of the rendered pods become folders
holding those files and keys; the rendered environment (paths, secretKeyRefs resolved) starts
the services' own ``TierServer``. Then the pods' exec probe (docker/grpc-health.py, the image's
``specdec-health``) must pass over mTLS, a wrong server name must fail it, and a tier must
serve the coordinator's certificate but refuse the tier's own (PERMISSION_DENIED).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "specdec"
HEALTH = ROOT / "docker" / "grpc-health.py"
ECHO = "/specdec.test.Echo/Echo"  # a stand-in for the tiers' RPCs, behind the same access check


def render(values: str) -> dict[tuple[str, str], dict[str, Any]]:
    sys.path.insert(0, str(ROOT / "tests" / "helm"))
    from helmbin import helm_binary

    args = [helm_binary(), "template", "rel", str(CHART), "-n", "specdec", "-f", str(CHART / "ci" / values)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """Secrets as files; each pod's mounts and env made real under ``root``/its name."""

    def __init__(self, root: Path, docs: Mapping[tuple[str, str], dict[str, Any]]) -> None:
        import base64

        import trustme

        self.root = root
        self.ca = trustme.CA(organization_name="specdec test CA")
        self.secrets: dict[str, dict[str, bytes]] = {
            name: {k: base64.b64decode(v) for k, v in d["data"].items()}
            for (kind, name), d in docs.items()
            if kind == "Secret"
        }
        for (kind, _), cert in docs.items():
            if kind == "Certificate":  # what cert-manager would write into its Secret
                spec = cert["spec"]
                issued = self.ca.issue_cert(*spec["dnsNames"], common_name=spec["commonName"])
                self.secrets[spec["secretName"]] = {
                    "tls.crt": b"".join(b.bytes() for b in issued.cert_chain_pems),
                    "tls.key": issued.private_key_pem.bytes(),
                    "ca.crt": self.ca.cert_pem.bytes(),
                }

    def path(self, pod: str, container_path: str) -> str:
        return str(self.root / pod / container_path.lstrip("/"))

    def mount(self, name: str, pod: Mapping[str, Any]) -> None:
        """Write each mounted Secret volume's files (its items, else every key), as the kubelet does."""
        volumes = {v["name"]: v for v in pod["volumes"]}
        for m in pod["containers"][0]["volumeMounts"]:
            source = volumes[m["name"]].get("secret")
            if source is None:
                continue
            assert "subPath" not in m  # a subPath mount never sees a renewed Secret
            data = self.secrets[source["secretName"]]
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            self.write(Path(self.path(name, m["mountPath"])), {i["path"]: data[i["key"]] for i in items})

    def write(self, folder: Path, files: Mapping[str, bytes]) -> None:
        """The kubelet's layout of a Secret volume: the files in a timestamped folder that the
        ``..data`` link names, each file a link through ``..data``. An update writes a new folder
        and swaps ``..data`` in one rename, so a reader never sees half a rotation."""
        folder.mkdir(parents=True, exist_ok=True)
        version = folder / f"..{time.time_ns()}"
        version.mkdir()
        for file, content in files.items():
            (version / file).write_bytes(content)
        swap = folder / "..data_tmp"
        swap.symlink_to(version.name)
        swap.replace(folder / "..data")
        for file in files:
            if not (folder / file).is_symlink():
                (folder / file).symlink_to(f"..data/{file}")

    def renew(self, spec: Mapping[str, Any], name: str, pod: Mapping[str, Any]) -> bytes:
        """A new certificate (new key) as Certificate ``spec`` says, written into the pod's ``tls``
        volume as a renewal is: its DER."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        issued = self.ca.issue_cert(*spec["dnsNames"], common_name=spec["commonName"])
        files = {
            "tls.crt": b"".join(b.bytes() for b in issued.cert_chain_pems),
            "tls.key": issued.private_key_pem.bytes(),
        }
        files["ca.crt"] = self.ca.cert_pem.bytes()
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "tls")
        self.write(Path(self.path(name, mount["mountPath"])), files)
        return x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes()).public_bytes(
            serialization.Encoding.DER
        )

    def env(self, name: str, pod: Mapping[str, Any], port: int) -> dict[str, str]:
        """The container's SPECDEC_* environment with Secret references resolved and file paths
        moved under ``root``; bound to loopback on ``port``, no Redis, metrics or HTTP."""
        env: dict[str, str] = {}
        for e in pod["containers"][0]["env"]:
            if not e["name"].startswith("SPECDEC_"):
                continue
            if "valueFrom" in e:
                ref = e["valueFrom"]["secretKeyRef"]
                value = self.secrets[ref["name"]][ref["key"]].decode()
            else:
                value = e["value"]
            env[e["name"]] = self.path(name, value) if value.startswith("/etc/specdec/") else value
        local = {"SPECDEC_PORT": str(port), "SPECDEC_HOST": "127.0.0.1", "SPECDEC_METRICS_PORT": "0"}
        env.update(local, SPECDEC_HTTP_PORT="0", SPECDEC_ADVERTISE_HOST="127.0.0.1")
        env.pop("SPECDEC_REDIS_URL", None)
        env.pop("SPECDEC_KV_REDIS_URL", None)
        return env


def served_certificate(port: int, client: Any) -> bytes:
    """The DER certificate a TLS server on ``port`` presents (to a client with ``client``'s files)."""
    context = ssl.create_default_context(cafile=client.ca)
    context.check_hostname = False  # the name is grpc's business here; this reads the certificate
    context.load_cert_chain(client.cert, client.key)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def add_echo(server: grpc.aio.Server) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("specdec.test.Echo", {"Echo": handler}),))


async def probe(command: list[str], env: Mapping[str, str], port: int) -> tuple[int, str]:
    """The pod's exec probe, run with the container's environment (as the kubelet does)."""
    assert command[0] == "specdec-health" and command[1].startswith("127.0.0.1:")
    argv = [sys.executable, str(HEALTH), f"127.0.0.1:{port}", *command[2:]]
    proc = await asyncio.create_subprocess_exec(
        *argv, env={"PATH": "/usr/bin:/bin", **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


def pod_of(docs: Mapping[tuple[str, str], dict[str, Any]], tier: str) -> dict[str, Any]:
    from specdec_operator import resources
    from specdec_operator.spec import parse

    spec = parse(docs[("SpeculativeDecoder", "default")]["spec"])
    owner = {"metadata": {"name": "default", "namespace": "specdec", "uid": "u"}}
    pod: dict[str, Any] = resources.deployment(owner, spec, tier, 1)["spec"]["template"]["spec"]
    return pod


async def serving(tier: str, env: Mapping[str, str], body: Callable[[str], Any]) -> None:
    from specdec.config import Settings
    from specdec.rpc.server import TierServer

    server = TierServer(tier, Settings.from_env(environ=dict(env)), [], add_echo, load=dict)
    await server.start()
    try:
        await body(server.address)
    finally:
        await server.stop(0)


@pytest.mark.parametrize("values", ["security-cert-manager-values.yaml", "security-existing-secrets-values.yaml"])
def test_rendered_pods_serve_mtls_pass_their_probe_and_admit_only_the_coordinator(tmp_path: Path, values: str) -> None:
    from specdec.rpc.streams import Dial
    from specdec.rpc.tls import TlsFiles

    docs = render("security-cert-manager-values.yaml")
    cluster = Cluster(tmp_path, docs)
    tier_certificate = docs[("Certificate", "rel-specdec-tier-tls")]["spec"]
    if values == "security-existing-secrets-values.yaml":
        # The same certificates, as Secrets a platform team made: CA in a Secret of its own.
        existing = render(values)
        for ours, theirs in (
            ("rel-specdec-coordinator-tls", "specdec-coordinator-tls"),
            ("rel-specdec-tier-tls", "specdec-tier-tls"),
        ):
            cluster.secrets[theirs] = {k: v for k, v in cluster.secrets[ours].items() if k != "ca.crt"}
        cluster.secrets["specdec-ca"] = {"ca.pem": cluster.ca.cert_pem.bytes()}
        cluster.secrets["specdec-internal"] = cluster.secrets["rel-specdec-internal"]
        cluster.secrets["specdec-api-keys"] = {"digests": cluster.secrets["rel-specdec-api-keys"]["api-keys"]}
        cluster.secrets["specdec-redis-auth"] = cluster.secrets["rel-specdec-redis-auth"]
        cluster.secrets["specdec-kv-redis-auth"] = cluster.secrets["rel-specdec-kv-redis-auth"]
        cluster.secrets["specdec-redis-tls"] = cluster.secrets["rel-specdec-redis-tls"]
        docs = existing
    pods = {tier: pod_of(docs, tier) for tier in ("coordinator", "target")}
    for tier, pod in pods.items():
        cluster.mount(tier, pod)
    ports = {tier: free_port() for tier in pods}
    envs = {tier: cluster.env(tier, pod, ports[tier]) for tier, pod in pods.items()}
    coordinator_files = TlsFiles(
        envs["coordinator"]["SPECDEC_TLS_CERT_FILE"],
        envs["coordinator"]["SPECDEC_TLS_KEY_FILE"],
        envs["coordinator"]["SPECDEC_TLS_CA_FILE"],
    )
    tier_files = TlsFiles(
        envs["target"]["SPECDEC_TLS_CERT_FILE"],
        envs["target"]["SPECDEC_TLS_KEY_FILE"],
        envs["target"]["SPECDEC_TLS_CA_FILE"],
    )

    async def check_target(address: str) -> None:
        command = pods["target"]["containers"][0]["readinessProbe"]["exec"]["command"]
        rc, out = await probe(command, envs["target"], ports["target"])
        assert rc == 0 and "SERVING" in out, out
        rc, out = await probe([*command[:-1], "default-coordinator"], envs["target"], ports["target"])
        assert rc != 0, out  # the probe checks the server's name: a tier certificate is not the coordinator's
        async with Dial(coordinator_files).channel(address) as ch:  # the coordinator, as it dials a replica
            assert await ch.unary_unary(ECHO)(b"draft", timeout=10) == b"draft"
        async with Dial(tier_files).channel(address) as ch:  # a tier's key passing for a coordinator
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await ch.unary_unary(ECHO)(b"draft", timeout=10)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # cert-manager renews the tier certificate: the kubelet swaps the mounted files and the
        # running server presents the new one on the next handshake, and the probe passes with it.
        renewed = cluster.renew(tier_certificate, "target", pods["target"])
        assert await asyncio.to_thread(served_certificate, ports["target"], coordinator_files) == renewed
        rc, out = await probe(command, envs["target"], ports["target"])
        assert rc == 0 and "SERVING" in out, out
        async with Dial(coordinator_files).channel(address) as ch:
            assert await ch.unary_unary(ECHO)(b"after", timeout=10) == b"after"

    async def check_coordinator(address: str) -> None:
        command = pods["coordinator"]["containers"][0]["readinessProbe"]["exec"]["command"]
        assert command[-1] == "default-coordinator"
        rc, out = await probe(command, envs["coordinator"], ports["coordinator"])
        assert rc == 0 and "SERVING" in out, out
        rc, out = await probe([*command[:-1], "specdec-tier"], envs["coordinator"], ports["coordinator"])
        assert rc != 0, out

    async def both() -> None:
        await serving("target", envs["target"], check_target)
        await serving("coordinator", envs["coordinator"], check_coordinator)

    asyncio.run(both())


@pytest.mark.parametrize(
    "spec,problem",
    [
        ({"tls": {"coordinatorSecretName": "c"}}, "spec.tls: coordinatorSecretName and tierSecretName"),
        ({"apiKeys": {"maxCallsPerKey": -1, "secretRef": {"name": "k"}}}, "spec.apiKeys.maxCallsPerKey"),
        ({"kvSecretRef": {"key": "k"}}, "spec.kvSecretRef.name is required"),
        ({"http": {"enabled": True, "port": 50051}}, "spec.http.port 50051"),
    ],
)
def test_spec_refuses_incomplete_security(spec: dict[str, Any], problem: str) -> None:
    from specdec_operator.spec import parse

    with pytest.raises(ValueError, match=problem):
        parse({"model": {"name": "m"}, **spec})


def test_the_operators_default_redis_password_is_not_handed_out() -> None:
    """A resource naming no Redis gets the operator's default URL without its password: whoever
    may create a SpeculativeDecoder must not read the bundled Valkey's password off their pods."""
    from specdec_operator import resources
    from specdec_operator.spec import parse

    owner = {"metadata": {"name": "d", "namespace": "team-a", "uid": "u"}}
    default = "rediss://:s3cret@rel-specdec-redis.specdec.svc:6380/0"
    for raw, want in (
        ({}, "rediss://rel-specdec-redis.specdec.svc:6380/0"),
        ({"redis": {"url": "redis://:mine@r:6379/0"}}, "redis://:mine@r:6379/0"),  # the resource's own choice
    ):
        spec = parse({"model": {"name": "m"}, **raw})
        pod = resources.deployment(owner, spec, "target", 1, default_redis_url=default)["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["SPECDEC_REDIS_URL"] == want
        assert "s3cret" not in yaml.safe_dump(pod)
