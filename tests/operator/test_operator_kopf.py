"""The real operator under kopf, against the kmock Kubernetes emulator and a real Valkey.

One operator serves the module; every test makes its own ``SpeculativeDecoder`` in its
own namespace (so its Deployments, Events and Redis keys are its own) and stands alone.

A small "fleet" thread plays that decoder's replicas: for every replica each Deployment
asks for, it publishes the services' heartbeat JSON into Redis (SET ... EX 10) every
0.2 s, spreading a per-tier demand over them; replicas that a scale-down removes delete
their key, as a gracefully stopping service does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from emulator import EmulatorThread

from specdec_records import Keys, Load, ReplicaRecord, connect

INTERVAL_S = 0.25
NAME = "demo"
IMAGE = "ghcr.io/specdec/specdec:0.1.0"
WINDOW_S = 3.0
TIERS = ("coordinator", "draft", "target")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Decoder:
    """One test's SpeculativeDecoder, its namespace and its fleet; reads from the API."""

    def __init__(self, api: EmulatorThread, namespace: str, redis_url: str) -> None:
        self.api, self.ns, self.name, self.redis_url = api, namespace, NAME, redis_url
        self.cr_path = f"/apis/specdec.io/v1alpha1/namespaces/{namespace}/speculativedecoders"
        self.fleet = Fleet(self, redis_url)
        self.cr: dict[str, Any] = {}  # the resource as created

    def create(self) -> None:
        self.cr = self.api.request("POST", self.cr_path, manifest(self.ns, self.redis_url))

    def resource(self) -> Any:
        return self.api.request("GET", f"{self.cr_path}/{self.name}")

    def dep_path(self, tier: str) -> str:
        return f"/apis/apps/v1/namespaces/{self.ns}/deployments/{self.name}-{tier}"

    def deployment(self, tier: str) -> Any:
        return self.api.request("GET", self.dep_path(tier))

    def replicas(self, tier: str) -> int | None:
        dep = self.deployment(tier)
        return None if dep is None else dep["spec"]["replicas"]

    def service(self, tier: str) -> Any:
        return self.api.request("GET", f"/api/v1/namespaces/{self.ns}/services/{self.name}-{tier}")

    def pdb(self, tier: str) -> Any:
        return self.api.request("GET", f"/apis/policy/v1/namespaces/{self.ns}/poddisruptionbudgets/{self.name}-{tier}")

    def applied(self) -> bool:
        """Whether a reconcile pass has finished: every tier is in status."""
        status = (self.resource() or {}).get("status") or {}
        return set(status.get("tiers") or ()) == set(TIERS)

    def events(self, reason: str) -> list[dict[str, Any]]:
        path = f"/api/v1/namespaces/{self.ns}/events"
        return [e for e in (self.api.request("GET", path) or {}).get("items", []) if e.get("reason") == reason]


class Fleet(threading.Thread):
    """Publishes heartbeats for the replicas one decoder's Deployments ask for."""

    def __init__(self, decoder: Decoder, redis_url: str) -> None:
        super().__init__(name=f"fleet-{decoder.ns}", daemon=True)
        from specdec_operator.resources import redis_prefix

        self.decoder = decoder
        self.r = connect(redis_url)
        self.keys = Keys(redis_prefix(decoder.ns, decoder.name))  # the prefix the operator reads
        self.demand = {"coordinator": 0.0, "draft": 0.0, "target": 0.0}  # total utilization
        self.tps = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            now = time.time()
            for tier in TIERS:
                n = self.decoder.replicas(tier) or 0
                for key in self.r.scan_iter(self.keys.replicas(tier)):
                    if int(key.rsplit(b"-", 1)[1]) >= n:
                        self.r.delete(key)
                for i in range(n):
                    busy = self.demand[tier] > 0
                    record = ReplicaRecord(
                        tier,
                        f"10.0.0.{i}:5005{TIERS.index(tier) + 1}",
                        "tiny",
                        replica_id=f"{tier}-{i}",
                        pid=100 + i,
                        started_at=now - 60,
                        heartbeat_at=now,
                        load=Load(
                            active_sessions=2 if busy else 0,
                            batch_utilization=min(1.0, self.demand[tier] / n),
                            tokens_per_s=self.tps / n if tier == "target" else 0.0,
                            acceptance_rate=0.7 if tier == "target" else None,
                        ),
                    )
                    self.r.set(self.keys.replica(tier, record.replica_id), record.to_json(), ex=10)

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        for key in self.r.scan_iter(self.keys.everything()):
            self.r.delete(key)
        self.r.close()


def manifest(namespace: str, redis_url: str) -> dict[str, Any]:
    fast = {
        "scaleDownStabilizationSeconds": WINDOW_S,
        "scaleUpStabilizationSeconds": 0,
        "maxScaleUpStep": 2,
        "maxScaleDownStep": 1,
        "headroom": 0.0,
        "targetUtilization": 0.5,
        "targetQueueDepth": None,
    }
    return {
        "apiVersion": "specdec.io/v1alpha1",
        "kind": "SpeculativeDecoder",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "drafter": {"type": "ngram"},
            "draftLength": 4,
            "image": IMAGE,
            "redis": {"url": redis_url},
            "tracing": {"endpoint": "http://otel-collector:4317"},
            "coordinator": {"minReplicas": 1, "maxReplicas": 3},
            "draft": {
                "minReplicas": 1,
                "maxReplicas": 4,
                "autoscaling": {**fast, "scaleToZero": True, "draftTokensPerSecondPerReplica": 1000},
            },
            "target": {
                "minReplicas": 1,
                "maxReplicas": 5,
                "gpu": {"count": 1, "type": "NVIDIA-H100-80GB-HBM3"},
                "autoscaling": fast,
            },
        },
    }


@pytest.fixture(scope="module")
def operator() -> Iterator[EmulatorThread]:
    """The emulator and the operator under kopf, with its environment restored afterwards."""
    from kopf.testing import KopfRunner

    # The handlers read their settings (the timer interval) when imported: here, by kopf.
    assert "specdec_operator.handlers" not in sys.modules, "handlers imported before the operator"
    with EmulatorThread() as api, pytest.MonkeyPatch.context() as env:
        env.setenv("SPECDEC_OPERATOR_INTERVAL_S", str(INTERVAL_S))
        env.setenv("SPECDEC_OPERATOR_API_URL", api.url)
        env.delenv("SPECDEC_OPERATOR_REDIS_URL", raising=False)
        args = ["run", "--standalone", "--all-namespaces", "-m", "specdec_operator.handlers"]
        with KopfRunner(args, timeout=30) as runner:
            yield api
    assert runner.exception is None, runner.output[-3000:]


@pytest.fixture
def decoder(operator: EmulatorThread, valkey, request: pytest.FixtureRequest) -> Iterator[Decoder]:
    """This test's decoder, created, in a namespace of its own, its fleet heartbeating."""
    ns = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:63].rstrip("-")
    d = Decoder(operator, ns, valkey.url)
    d.fleet.start()
    d.create()
    yield d
    d.fleet.close()
    if d.resource() is not None:
        operator.request("DELETE", f"{d.cr_path}/{d.name}")  # the operator cleans up later


def test_create_makes_each_tier(decoder: Decoder, valkey) -> None:
    d = decoder
    for tier in TIERS:
        dep = wait_for(f"{tier} deployment", lambda: d.deployment(tier))
        assert dep["metadata"]["ownerReferences"][0]["uid"] == d.cr["metadata"]["uid"]
        assert dep["metadata"]["ownerReferences"][0]["controller"] is True
        c = dep["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert c["command"] == ["specdec", "serve", tier]
        assert env["SPECDEC_REDIS_PREFIX"] == f"specdec:{d.ns}.{d.name}:"
        assert env["SPECDEC_REDIS_URL"] == valkey.url and env["SPECDEC_DRAFTER"] == "ngram"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert c["readinessProbe"]["grpc"]["port"] == {"coordinator": 50051, "draft": 50052, "target": 50053}[tier]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert wait_for("service", lambda: d.service(tier))
        assert wait_for("pdb", lambda: d.pdb(tier))
    target = d.deployment("target")["spec"]["template"]["spec"]
    assert target["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert target["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    status = wait_for("status", lambda: (d.resource() or {}).get("status", {}).get("tiers"))
    assert set(status) == set(TIERS)


def test_idle_draft_tier_scales_to_zero_and_back(decoder: Decoder) -> None:
    d = decoder
    wait_for("draft at 0", lambda: d.replicas("draft") == 0, timeout=WINDOW_S + 10)
    d.fleet.tps = 100.0
    d.fleet.demand["target"] = 0.4  # the target tier is busy: drafting is needed again
    wait_for("draft back up", lambda: (d.replicas("draft") or 0) >= 1)


def scale_target_to_4(d: Decoder) -> None:
    d.fleet.tps = 2400.0
    d.fleet.demand["target"] = 2.0  # 2 replicas' worth at 100%: 4 at target 0.5
    wait_for("target at 4", lambda: d.replicas("target") == 4)


def test_load_scales_target_up_and_draft_follows(decoder: Decoder) -> None:
    d = decoder
    wait_for("applied", d.applied)  # the load arrives at a running decoder
    scale_target_to_4(d)
    # 2400 tok/s at a=0.7, k=4 needs ~3470 draft tok/s: 1000/replica at 0.5 -> 4 (max).
    wait_for("draft up", lambda: (d.replicas("draft") or 0) >= 2)
    ups = d.events("ScaledUp")
    assert any("target: " in e["message"] for e in ups)
    assert all(e["involvedObject"]["name"] == d.name for e in ups)


def test_scale_down_waits_for_the_window(decoder: Decoder) -> None:
    d = decoder
    scale_target_to_4(d)
    assert d.replicas("target") == 4
    d.fleet.demand["target"] = 0.4
    d.fleet.tps = 100.0
    dropped = time.monotonic()
    wait_for("target below 4", lambda: d.replicas("target") < 4, timeout=WINDOW_S + 10)
    # The last "4 replicas" recommendation came from the tick before the drop (<= one
    # interval earlier, plus timer jitter); the window counts from that recommendation.
    assert time.monotonic() - dropped >= WINDOW_S - 2 * INTERVAL_S
    wait_for("target at 1", lambda: d.replicas("target") == 1, timeout=10)
    downs = [e["message"] for e in d.events("ScaledDown") if e["message"].startswith("target")]
    assert {"target: 4 -> 3", "target: 3 -> 2", "target: 2 -> 1"} <= {m.split(" replicas")[0] for m in downs}


def test_edit_propagates_to_deployments(decoder: Decoder) -> None:
    d = decoder
    wait_for("applied", d.applied)
    d.api.request(
        "PATCH",
        f"{d.cr_path}/{d.name}",
        {"spec": {"model": {"name": "org/other-model"}, "image": "ghcr.io/specdec/specdec:0.2.0"}},
        content_type="application/merge-patch+json",
    )

    def updated() -> bool:
        for tier in TIERS:
            c = d.deployment(tier)["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in c["env"]}
            if env["SPECDEC_MODEL"] != "org/other-model" or not c["image"].endswith(":0.2.0"):
                return False
        return True

    wait_for("edited deployments", updated)


def test_drift_is_reapplied(decoder: Decoder) -> None:
    d = decoder
    wait_for("applied", d.applied)
    containers = d.deployment("coordinator")["spec"]["template"]["spec"]["containers"]
    containers[0]["image"] = "example.com/tampered:1"
    d.api.request(
        "PATCH",
        d.dep_path("coordinator"),
        {"spec": {"template": {"spec": {"containers": containers}}}},
        content_type="application/merge-patch+json",
    )
    wait_for(
        "drift corrected",
        lambda: d.deployment("coordinator")["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE,
    )
    # The Event is posted in the background, after the re-apply.
    assert wait_for("DriftCorrected event", lambda: d.events("DriftCorrected"), timeout=5)


def test_delete_removes_everything(decoder: Decoder) -> None:
    d = decoder
    wait_for("applied", d.applied)
    for tier in TIERS:
        assert d.deployment(tier) and d.service(tier) and d.pdb(tier)
    d.api.request("DELETE", f"{d.cr_path}/{d.name}")
    wait_for("resource gone", lambda: d.resource() is None)
    for tier in TIERS:
        assert d.deployment(tier) is None
        assert d.service(tier) is None
        assert d.pdb(tier) is None


def test_uninstall_hook_deletes_decoders_while_the_operator_runs(decoder: Decoder) -> None:
    """The chart's pre-delete hook: every decoder in the watched namespaces goes, with its
    tiers, before helm removes the operator (whose finalizer would otherwise hold them)."""
    d = decoder
    make(d, "second")
    wait_for("applied", d.applied)
    wait_for(
        "second applied", lambda: d.api.request("GET", f"/apis/apps/v1/namespaces/{d.ns}/deployments/second-target")
    )
    assert d.resource()["metadata"].get("finalizers")  # kopf holds it until it has run
    env = {**os.environ, "SPECDEC_OPERATOR_API_URL": d.api.url, "SPECDEC_OPERATOR_NAMESPACES": d.ns}
    out = subprocess.run(
        [sys.executable, "-m", "specdec_operator.uninstall", "--timeout", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "0 finalizer(s) stripped" in out.stderr, out.stderr
    assert d.resource() is None and d.api.request("GET", f"{d.cr_path}/second") is None
    for name in (d.name, "second"):
        for tier in TIERS:
            assert d.api.request("GET", f"/apis/apps/v1/namespaces/{d.ns}/deployments/{name}-{tier}") is None


# ---- failures said, not swallowed --------------------------------------------------------


def make(d: Decoder, name: str, **spec: Any) -> str:
    """Another SpeculativeDecoder in the test's namespace, with ``spec`` over the usual one."""
    body = manifest(d.ns, d.redis_url)
    body["metadata"]["name"] = name
    body["spec"].update(spec)
    d.api.request("POST", d.cr_path, body)
    return f"{d.cr_path}/{name}"


def condition(api: EmulatorThread, path: str, kind: str) -> dict[str, Any] | None:
    status = (api.request("GET", path) or {}).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)


def said(d: Decoder, path: str, reason: str, kind: str = "Degraded") -> dict[str, Any]:
    """The condition carrying ``reason``, once it is there and an Event says it too."""
    c = wait_for(f"{kind} {reason}", lambda: (c := condition(d.api, path, kind)) and c["reason"] == reason and c)
    events = wait_for(f"{reason} event", lambda: d.events(reason), timeout=5)
    assert events[0]["type"] == "Warning" and events[0]["involvedObject"]["name"] == path.rsplit("/", 1)[1]
    return c


@pytest.mark.parametrize("case", ["missing", "forbidden"])
def test_an_unreadable_redis_secret_is_said(decoder: Decoder, case: str) -> None:
    d = decoder
    if case == "forbidden":
        d.api.emulator.forbidden.add(("secrets", d.ns, "redis-url"))
    path = make(d, "secret", redis={"urlSecretRef": {"name": "redis-url", "key": "url"}})
    reason = {"missing": "SecretNotFound", "forbidden": "SecretForbidden"}[case]
    c = said(d, path, reason)
    assert "redis-url" in c["message"] and c["status"] == "True"
    # The tiers deploy all the same (their pods read the Secret themselves); only autoscaling waits.
    assert wait_for(
        "deployment", lambda: d.api.request("GET", f"/apis/apps/v1/namespaces/{d.ns}/deployments/secret-target")
    )
    time.sleep(4 * INTERVAL_S)
    assert len(d.events(reason)) == 1  # said once, not on every timer tick


def test_an_invalid_spec_is_said(decoder: Decoder) -> None:
    d = decoder
    path = make(d, "bad", target={"minReplicas": 1, "maxReplicas": 2, "gpu": {"count": 4}})
    c = said(d, path, "InvalidSpec", kind="Ready")
    assert "gpu.count 4 is refused" in c["message"] and c["observedGeneration"] == 1
    assert d.api.request("GET", f"/apis/apps/v1/namespaces/{d.ns}/deployments/bad-target") is None


def test_an_unschedulable_tier_is_said(decoder: Decoder) -> None:
    d = decoder
    wait_for("applied", d.applied)
    labels = d.deployment("target")["spec"]["template"]["metadata"]["labels"]
    d.api.request(
        "POST",
        f"/api/v1/namespaces/{d.ns}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "demo-target-x1", "namespace": d.ns, "labels": labels},
            "spec": {"containers": [{"name": "target", "image": IMAGE}]},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    }
                ],
            },
        },
    )
    c = said(d, f"{d.cr_path}/{d.name}", "Unschedulable", kind="Ready")
    assert "Insufficient nvidia.com/gpu" in c["message"] and c["status"] == "False"
    assert c["observedGeneration"] == 1


# ---- autoscaling handed to an HPA/KEDA; models delivered once ----------------------------


def test_external_autoscaling_leaves_replicas_alone(decoder: Decoder) -> None:
    d = decoder
    path = make(d, "ext", target={"minReplicas": 1, "maxReplicas": 8, "autoscaling": {"mode": "external"}})
    dep_path = f"/apis/apps/v1/namespaces/{d.ns}/deployments/ext-target"
    dep = wait_for("deployment", lambda: d.api.request("GET", dep_path))
    assert "replicas" not in dep["spec"]
    d.api.request(
        "PATCH",
        dep_path,
        {"spec": {"replicas": 5}},  # what an HPA does
        content_type="application/merge-patch+json",
    )
    wait_for(
        "status shows the HPA's count",
        lambda: (
            (d.api.request("GET", path) or {})
            .get("status", {})
            .get("tiers", {})
            .get("target", {})
            .get("desiredReplicas")
            == 5
        ),
    )
    time.sleep(4 * INTERVAL_S)
    assert d.api.request("GET", dep_path)["spec"]["replicas"] == 5


def test_model_cache_is_one_volume_filled_once(decoder: Decoder) -> None:
    d = decoder
    make(
        d,
        "cached",
        model={
            "name": "org/big-model",
            "sizeGB": 140,
            "tokenSecretRef": {"name": "hub", "key": "token"},
            "cache": {"size": "300Gi", "storageClassName": "nfs"},
        },
    )
    pvc = wait_for(
        "pvc", lambda: d.api.request("GET", f"/api/v1/namespaces/{d.ns}/persistentvolumeclaims/cached-model-cache")
    )
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "nfs"
    assert pvc["metadata"]["ownerReferences"][0]["kind"] == "SpeculativeDecoder"
    for tier in TIERS:
        dep = wait_for(
            f"{tier}", lambda: d.api.request("GET", f"/apis/apps/v1/namespaces/{d.ns}/deployments/cached-{tier}")
        )
        pod = dep["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "cached-model-cache"
        assert volumes["tmp"]["emptyDir"]["sizeLimit"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hub", "key": "token"}
        if tier == "draft":  # an n-gram drafter loads no model
            assert "initContainers" not in pod and "HF_HUB_OFFLINE" not in env
            continue
        init = pod["initContainers"][0]
        assert init["name"] == "fetch-model" and init["command"][-1].startswith("org/big-model")
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
    target = d.api.request("GET", f"/apis/apps/v1/namespaces/{d.ns}/deployments/cached-target")
    coord = d.api.request("GET", f"/apis/apps/v1/namespaces/{d.ns}/deployments/cached-coordinator")
    budget = lambda dep: dep["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"]
    assert budget(target) * 5 >= 140 * 20 > budget(coord) * 5  # 140 GB: ~50 min, not 10


def test_security_settings_reach_every_tier_pod(decoder: Decoder) -> None:
    """TLS, API keys, the internal token, the KV MAC key, a rediss CA and the HTTP port in the
    resource become Secret volumes (never subPath: renewals reach the files), paths and
    secretKeyRefs in the pods the operator runs."""
    d = decoder
    make(
        d,
        "secure",
        redis={"urlSecretRef": {"name": "redis-auth", "key": "url"}, "tls": {"caSecretRef": {"name": "redis-tls"}}},
        tls={"coordinatorSecretName": "coord-tls", "tierSecretName": "tier-tls", "clientAuth": True},
        apiKeys={"secretRef": {"name": "keys"}, "maxCallsPerKey": 8},
        internalTokenSecretRef={"name": "internal", "key": "internal-token"},
        kvSecretRef={"name": "internal", "key": "kv-secret"},
        http={"enabled": True, "port": 8080},
    )
    path = lambda tier: f"/apis/apps/v1/namespaces/{d.ns}/deployments/secure-{tier}"
    for tier in TIERS:
        pod = wait_for(tier, lambda: d.api.request("GET", path(tier)))["spec"]["template"]["spec"]
        c = pod["containers"][0]
        env = {e["name"]: e for e in c["env"]}
        volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert volumes["tls"]["secretName"] == ("coord-tls" if tier == "coordinator" else "tier-tls")
        assert mounts["tls"]["mountPath"] == "/etc/specdec/tls" and mounts["tls"]["readOnly"] is True
        assert not any("subPath" in m for m in c["volumeMounts"])
        assert env["SPECDEC_TLS_CERT_FILE"]["value"] == "/etc/specdec/tls/tls.crt"
        assert env["SPECDEC_TLS_KEY_FILE"]["value"] == "/etc/specdec/tls/tls.key"
        assert env["SPECDEC_TLS_CA_FILE"]["value"] == "/etc/specdec/tls/ca.crt"
        assert env["SPECDEC_TLS_CLIENT_AUTH"]["value"] == "true"
        assert env["SPECDEC_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "url"}
        assert volumes["redis-ca"] == {
            "secretName": "redis-tls",
            "defaultMode": 0o440,
            "items": [{"key": "ca.crt", "path": "ca.crt"}],
        }
        assert mounts["redis-ca"]["mountPath"] == "/etc/specdec/redis-ca"
        assert env["SPECDEC_REDIS_CA"]["value"] == "/etc/specdec/redis-ca/ca.crt"
        assert env["SPECDEC_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "internal",
            "key": "internal-token",
        }
        # The kubelet's gRPC probe has no TLS: the image's specdec-health checks over mTLS instead.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["exec"]["command"][:2] == ["specdec-health", f"127.0.0.1:{c['ports'][0]['containerPort']}"]
        if tier == "coordinator":
            assert volumes["api-keys"]["items"] == [{"key": "api-keys", "path": "api-keys"}]
            assert env["SPECDEC_API_KEYS_FILE"]["value"] == "/etc/specdec/api-keys/api-keys"
            assert env["SPECDEC_API_KEY_MAX_CALLS"]["value"] == "8" and env["SPECDEC_HTTP_PORT"]["value"] == "8080"
            assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
            assert "SPECDEC_KV_SECRET" not in env
        else:
            assert "api-keys" not in volumes and "SPECDEC_HTTP_PORT" not in env
            assert env["SPECDEC_KV_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "internal", "key": "kv-secret"}
    svc = wait_for("service", lambda: d.api.request("GET", f"/api/v1/namespaces/{d.ns}/services/secure-coordinator"))
    http = next(p for p in svc["spec"]["ports"] if p["name"] == "http")
    assert (http["port"], http["targetPort"], http["appProtocol"]) == (8080, "http", "https")
