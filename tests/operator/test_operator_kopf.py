"""The real operator under kopf, against the kmock Kubernetes emulator and a real Valkey.

A small "fleet" thread plays the replicas: for every replica each Deployment asks for, it
publishes the services' heartbeat JSON into Redis (SET ... EX 10) every 0.2 s, spreading
a per-tier demand over them; replicas that a scale-down removes delete their key, as a
gracefully stopping service does.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

INTERVAL_S = 0.25
os.environ["SPECDEC_OPERATOR_INTERVAL_S"] = str(INTERVAL_S)

from emulator import EmulatorThread  # noqa: E402

NS, NAME = "default", "demo"
CR_PATH = f"/apis/specdec.io/v1alpha1/namespaces/{NS}/speculativedecoders"
WINDOW_S = 3.0
TIERS = ("coordinator", "draft", "target")


def dep_path(tier: str) -> str:
    return f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}-{tier}"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Fleet(threading.Thread):
    """Publishes heartbeats for the replicas the Deployments ask for."""

    def __init__(self, api: EmulatorThread, redis_url: str) -> None:
        super().__init__(name="fleet", daemon=True)
        import redis
        self.api = api
        self.r = redis.Redis.from_url(redis_url)
        self.prefix = f"specdec:{NS}.{NAME}:"
        self.demand = {"coordinator": 0.0, "draft": 0.0, "target": 0.0}  # total utilization
        self.tps = 0.0
        self.stop = threading.Event()

    def replicas(self, tier: str) -> int:
        dep = self.api.request("GET", dep_path(tier))
        return int(dep["spec"]["replicas"]) if dep else 0

    def run(self) -> None:
        while not self.stop.wait(0.2):
            now = time.time()
            for tier in TIERS:
                n = self.replicas(tier)
                for key in self.r.scan_iter(f"{self.prefix}replica:{tier}:*"):
                    if int(key.rsplit(b"-", 1)[1]) >= n:
                        self.r.delete(key)
                for i in range(n):
                    busy = self.demand[tier] > 0
                    value = {"tier": tier, "replica_id": f"{tier}-{i}",
                             "address": f"10.0.0.{i}:5005{TIERS.index(tier) + 1}", "pid": 100 + i,
                             "model": "tiny", "started_at": now - 60, "heartbeat_at": now,
                             "load": {"queue_depth": 0, "active_sessions": 2 if busy else 0,
                                      "batch_utilization": min(1.0, self.demand[tier] / n),
                                      "tokens_per_s": self.tps / n if tier == "target" else 0.0,
                                      "acceptance_rate": 0.7 if tier == "target" else None}}
                    self.r.set(f"{self.prefix}replica:{tier}:{tier}-{i}", json.dumps(value), ex=10)


def manifest(redis_url: str) -> dict[str, Any]:
    fast = {"scaleDownStabilizationSeconds": WINDOW_S, "scaleUpStabilizationSeconds": 0,
            "maxScaleUpStep": 2, "maxScaleDownStep": 1, "headroom": 0.0,
            "targetUtilization": 0.5, "targetQueueDepth": None}
    return {
        "apiVersion": "specdec.io/v1alpha1", "kind": "SpeculativeDecoder",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "drafter": {"type": "ngram"},
            "draftLength": 4,
            "image": "ghcr.io/specdec/specdec:0.1.0",
            "redis": {"url": redis_url},
            "tracing": {"endpoint": "http://otel-collector:4317"},
            "coordinator": {"minReplicas": 1, "maxReplicas": 3},
            "draft": {"minReplicas": 1, "maxReplicas": 4,
                      "autoscaling": {**fast, "scaleToZero": True,
                                      "draftTokensPerSecondPerReplica": 1000}},
            "target": {"minReplicas": 1, "maxReplicas": 5,
                       "gpu": {"count": 1, "type": "NVIDIA-H100-80GB-HBM3"},
                       "autoscaling": fast},
        },
    }


@pytest.fixture(scope="module")
def cluster(valkey) -> Iterator[tuple[EmulatorThread, Fleet, Any]]:
    from kopf.testing import KopfRunner

    with EmulatorThread() as api:
        os.environ["SPECDEC_OPERATOR_API_URL"] = api.url
        fleet = Fleet(api, valkey.url)
        fleet.r.flushall()
        fleet.start()
        args = ["run", "--standalone", "--all-namespaces", "-m", "specdec_operator.handlers"]
        with KopfRunner(args, timeout=30) as runner:
            yield api, fleet, runner
        fleet.stop.set()
        fleet.join(5)
        os.environ.pop("SPECDEC_OPERATOR_API_URL", None)
    assert runner.exception is None, runner.output[-3000:]


def replicas(api: EmulatorThread, tier: str) -> int | None:
    dep = api.request("GET", dep_path(tier))
    return None if dep is None else dep["spec"]["replicas"]


def events(api: EmulatorThread, reason: str) -> list[dict[str, Any]]:
    items = (api.request("GET", f"/api/v1/namespaces/{NS}/events") or {}).get("items", [])
    return [e for e in items if e.get("reason") == reason]


def test_create_makes_each_tier(cluster, valkey) -> None:
    api, fleet, _ = cluster
    cr = api.request("POST", CR_PATH, manifest(valkey.url))
    for tier in TIERS:
        dep = wait_for(f"{tier} deployment", lambda: api.request("GET", dep_path(tier)))
        assert dep["metadata"]["ownerReferences"][0]["uid"] == cr["metadata"]["uid"]
        assert dep["metadata"]["ownerReferences"][0]["controller"] is True
        c = dep["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert c["command"] == ["specdec", "serve", tier]
        assert env["SPECDEC_REDIS_PREFIX"] == f"specdec:{NS}.{NAME}:"
        assert env["SPECDEC_REDIS_URL"] == valkey.url and env["SPECDEC_DRAFTER"] == "ngram"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert c["readinessProbe"]["grpc"]["port"] == {"coordinator": 50051, "draft": 50052,
                                                        "target": 50053}[tier]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert wait_for("service", lambda: api.request(
            "GET", f"/api/v1/namespaces/{NS}/services/{NAME}-{tier}"))
        assert wait_for("pdb", lambda: api.request(
            "GET", f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{NAME}-{tier}"))
    target = api.request("GET", dep_path("target"))["spec"]["template"]["spec"]
    assert target["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert target["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    status = wait_for("status", lambda: (api.request("GET", f"{CR_PATH}/{NAME}") or {}).get("status", {}).get("tiers"))
    assert set(status) == set(TIERS)


def test_idle_draft_tier_scales_to_zero(cluster) -> None:
    api, fleet, _ = cluster
    wait_for("draft at 0", lambda: replicas(api, "draft") == 0, timeout=WINDOW_S + 10)


def test_load_scales_target_up_and_draft_follows(cluster) -> None:
    api, fleet, _ = cluster
    fleet.tps = 2400.0
    fleet.demand["target"] = 2.0          # 2 replicas' worth at 100%: 4 at target 0.5
    wait_for("target at 4", lambda: replicas(api, "target") == 4)
    # 2400 tok/s at a=0.7, k=4 needs ~3470 draft tok/s: 1000/replica at 0.5 -> 4 (max).
    wait_for("draft back up", lambda: (replicas(api, "draft") or 0) >= 2)
    ups = events(api, "ScaledUp")
    assert any("target: " in e["message"] for e in ups)
    assert all(e["involvedObject"]["name"] == NAME for e in ups)


def test_scale_down_waits_for_the_window(cluster) -> None:
    api, fleet, _ = cluster
    assert replicas(api, "target") == 4
    fleet.demand["target"] = 0.4
    fleet.tps = 100.0
    dropped = time.monotonic()
    wait_for("target below 4", lambda: replicas(api, "target") < 4, timeout=WINDOW_S + 10)
    # The last "4 replicas" recommendation came from the tick before the drop (<= one
    # interval earlier, plus timer jitter); the window counts from that recommendation.
    assert time.monotonic() - dropped >= WINDOW_S - 2 * INTERVAL_S
    wait_for("target at 1", lambda: replicas(api, "target") == 1, timeout=10)
    downs = [e["message"] for e in events(api, "ScaledDown") if e["message"].startswith("target")]
    assert {"target: 4 -> 3", "target: 3 -> 2", "target: 2 -> 1"} <= {m.split(" replicas")[0] for m in downs}


def test_edit_propagates_to_deployments(cluster) -> None:
    api, _, _ = cluster
    api.request("PATCH", f"{CR_PATH}/{NAME}", {"spec": {"model": {"name": "org/other-model"},
                                                        "image": "ghcr.io/specdec/specdec:0.2.0"}},
                content_type="application/merge-patch+json")

    def updated() -> bool:
        for tier in TIERS:
            c = api.request("GET", dep_path(tier))["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in c["env"]}
            if env["SPECDEC_MODEL"] != "org/other-model" or not c["image"].endswith(":0.2.0"):
                return False
        return True
    wait_for("edited deployments", updated)


def test_drift_is_reapplied(cluster) -> None:
    api, _, _ = cluster
    dep = api.request("GET", dep_path("coordinator"))
    containers = dep["spec"]["template"]["spec"]["containers"]
    containers[0]["image"] = "example.com/tampered:1"
    api.request("PATCH", dep_path("coordinator"), {"spec": {"template": {"spec": {"containers": containers}}}},
                content_type="application/merge-patch+json")
    wait_for("drift corrected", lambda: api.request("GET", dep_path("coordinator"))[
        "spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.2.0"))
    assert events(api, "DriftCorrected")


def test_delete_removes_everything(cluster) -> None:
    api, _, runner = cluster
    api.request("DELETE", f"{CR_PATH}/{NAME}")
    wait_for("resource gone", lambda: api.request("GET", f"{CR_PATH}/{NAME}") is None)
    for tier in TIERS:
        assert api.request("GET", dep_path(tier)) is None
        assert api.request("GET", f"/api/v1/namespaces/{NS}/services/{NAME}-{tier}") is None
        assert api.request("GET", f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{NAME}-{tier}") is None
