"""The pure parts of a reconcile pass (tier plans, status, conditions, drift), the shared
acceptance rate, the operator's settings, and its imports."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest

from specdec_operator import resources
from specdec_operator.config import OperatorConfig
from specdec_operator.plan import (
    conditions,
    current_replicas,
    decoder_status,
    invalid_spec_conditions,
    plan_tier,
    scaling_event,
)
from specdec_operator.policy import Coupling, Decision, Observed, ReplicaLoad, acceptance_rate
from specdec_operator.spec import parse

STAMP = "2030-01-02T03:04:05Z"
EARLIER = "2029-12-31T00:00:00Z"


def decoder_spec(**target: Any):
    return parse({"model": {"name": "org/model"}, "target": {"minReplicas": 1, "maxReplicas": 5, **target}})


def observed(reporting: int = 2, missing: int = 0, acceptance: float | None = 0.6543) -> Observed:
    return Observed(
        reporting=reporting,
        missing=missing,
        utilization=0.45678,
        queue_depth=1.2345,
        active_sessions=7,
        tokens_per_s=123.456,
        acceptance_rate=acceptance,
    )


def decision(current: int, desired: int, tier: str = "target", **obs: Any) -> Decision:
    return Decision(
        tier=tier,
        current=current,
        desired=desired,
        recommended=desired,
        direction="up" if desired > current else "down" if desired < current else "none",
        reason="load",
        observed=observed(**obs),
    )


# ---- one tier ------------------------------------------------------------------------


@pytest.mark.parametrize("current,expected", [(3, 3), (9, 5), (0, 1)])
def test_without_a_decision_the_count_is_kept_within_bounds(current: int, expected: int) -> None:
    t = decoder_spec().tiers["target"]
    plan = plan_tier(t, current, ready=1, old_status={"utilization": 0.5}, decision=None, stamp=STAMP)
    assert plan.replicas == expected
    assert plan.event is None and plan.problem is None
    assert plan.status == {"utilization": 0.5, "desiredReplicas": expected, "readyReplicas": 1}


def test_autoscaling_off_pins_min_replicas() -> None:
    t = decoder_spec(minReplicas=2, autoscaling={"enabled": False}).tiers["target"]
    assert plan_tier(t, 4, 4, {}, None, STAMP).replicas == 2
    with pytest.raises(AssertionError):
        plan_tier(t, 4, 4, {}, decision(4, 3), STAMP)


def test_a_scaling_decision_sets_count_event_and_status() -> None:
    t = decoder_spec().tiers["target"]
    plan = plan_tier(t, 2, 2, {"lastScaleTime": EARLIER}, decision(2, 4), STAMP)
    assert plan.replicas == 4
    assert plan.event == ("ScaledUp", "target: 2 -> 4 replicas: load")
    assert plan.problem is None
    assert plan.status == {
        "lastScaleTime": STAMP,
        "lastScaleReason": "target: 2 -> 4 replicas: load",
        "recommendedReplicas": 4,
        "reportingReplicas": 2,
        "activeSessions": 7,
        "tokensPerSecond": 123.46,
        "utilization": 0.457,
        "queueDepth": 1.23,
        "desiredReplicas": 4,
        "readyReplicas": 2,
    }


def test_a_steady_decision_keeps_the_last_scale_time_and_reports_silent_replicas() -> None:
    t = decoder_spec().tiers["target"]
    plan = plan_tier(t, 3, 3, {"lastScaleTime": EARLIER}, decision(3, 3, reporting=1, missing=2), STAMP)
    assert plan.event is None
    assert plan.status["lastScaleTime"] == EARLIER and "lastScaleReason" not in plan.status
    assert plan.problem == "target: 2 of 3 replicas not reporting"


def test_scale_down_event_and_no_event_without_change() -> None:
    assert scaling_event(decision(3, 2)) == ("ScaledDown", "target: 3 -> 2 replicas: load")
    assert scaling_event(decision(3, 3)) is None


def test_current_replicas_defaults_to_min_replicas() -> None:
    t = decoder_spec(minReplicas=2).tiers["target"]
    assert current_replicas(None, t) == 2
    assert current_replicas({"spec": {}}, t) == 2
    assert current_replicas({"spec": {"replicas": 0}}, t) == 0


# ---- the resource's status -----------------------------------------------------------


def tier(desired: int, ready: int) -> dict[str, int]:
    return {"desiredReplicas": desired, "readyReplicas": ready}


def by_type(conds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conds}


def test_status_of_a_healthy_steady_decoder() -> None:
    tiers = {"coordinator": tier(1, 1), "draft": tier(0, 0), "target": tier(2, 1)}
    status = decoder_status(
        7, tiers, [decision(1, 1, tier="coordinator", acceptance=None), decision(2, 2)], [], [], STAMP
    )
    assert status["observedGeneration"] == 7 and status["tiers"] == tiers
    assert status["acceptanceRate"] == 0.654
    c = by_type(status["conditions"])
    # A draft tier scaled to zero has nothing to be ready.
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("True", "TiersReady")
    assert (c["Scaling"]["status"], c["Scaling"]["reason"]) == ("False", "Stable")
    assert (c["Degraded"]["status"], c["Degraded"]["message"]) == ("False", "all replicas report load")
    assert {x["lastTransitionTime"] for x in status["conditions"]} == {STAMP}


def test_status_of_a_scaling_degraded_decoder_not_ready() -> None:
    tiers = {"coordinator": tier(1, 0), "draft": tier(2, 0), "target": tier(3, 3)}
    status = decoder_status(
        2,
        tiers,
        [decision(1, 2, tier="draft"), decision(3, 4)],
        ["Redis down", "target: 1 of 3 replicas not reporting"],
        [],
        STAMP,
    )
    c = by_type(status["conditions"])
    assert c["Ready"]["status"] == "False"
    assert c["Ready"]["message"] == "no ready replica in: coordinator, draft"
    assert (c["Scaling"]["status"], c["Scaling"]["message"]) == ("True", "draft 1->2; target 3->4")
    assert c["Degraded"]["status"] == "True"
    assert c["Degraded"]["message"] == "Redis down; target: 1 of 3 replicas not reporting"


def test_acceptance_comes_from_the_target_tier_only() -> None:
    tiers = {"target": tier(1, 1)}
    assert "acceptanceRate" not in decoder_status(1, tiers, [], [], [], STAMP)
    draft_only = [decision(1, 1, tier="draft", acceptance=0.9)]
    assert "acceptanceRate" not in decoder_status(1, tiers, draft_only, [], [], STAMP)
    unknown = [decision(1, 1, acceptance=None)]
    assert "acceptanceRate" not in decoder_status(1, tiers, unknown, [], [], STAMP)
    assert decoder_status(1, tiers, [decision(1, 1, acceptance=0.0)], [], [], STAMP)["acceptanceRate"] == 0.0


def test_conditions_keep_their_transition_time_until_the_status_flips() -> None:
    old = [
        {"type": "Ready", "status": "True", "lastTransitionTime": EARLIER},
        {"type": "Degraded", "status": "False", "lastTransitionTime": EARLIER},
    ]
    new = by_type(
        conditions(
            old,
            {
                "Ready": (True, "TiersReady", "ok"),
                "Degraded": (True, "Degraded", "x" * 1500),
                "Scaling": (False, "Stable", ""),
            },
            STAMP,
        )
    )
    assert new["Ready"]["lastTransitionTime"] == EARLIER  # unchanged status
    assert new["Degraded"]["lastTransitionTime"] == STAMP  # flipped
    assert new["Scaling"]["lastTransitionTime"] == STAMP  # new
    assert len(new["Degraded"]["message"]) == 1000


def test_an_invalid_spec_is_not_ready_and_degraded() -> None:
    c = by_type(invalid_spec_conditions([], "spec.model.name is required", STAMP))
    assert {k: (v["status"], v["reason"]) for k, v in c.items()} == {
        "Ready": ("False", "InvalidSpec"),
        "Scaling": ("False", "InvalidSpec"),
        "Degraded": ("True", "InvalidSpec"),
    }
    assert c["Ready"]["message"] == "spec.model.name is required"


# ---- drift ---------------------------------------------------------------------------


def test_a_new_replica_count_alone_is_not_drift() -> None:
    spec = decoder_spec()
    owner = {"metadata": {"name": "demo", "namespace": "ns", "uid": "u-1"}}
    wanted = resources.deployment(owner, spec, "target", 4)
    live = resources.deployment(owner, spec, "target", 2)
    assert resources.drifted(wanted, live)
    assert not resources.drifted_beyond_scale(wanted, live, replicas=2)
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "example.com/tampered:1"
    assert resources.drifted_beyond_scale(wanted, live, replicas=2)
    svc = resources.service(owner, spec, "target")
    assert resources.drifted_beyond_scale(svc, {**svc, "spec": {}}, replicas=2)


# ---- the tier-wide acceptance rate (one function for the policy and the operator) ----


def replica(acc: float | None, tps: float) -> ReplicaLoad:
    return ReplicaLoad(tier="target", replica_id="r", tokens_per_s=tps, acceptance_rate=acc)


def test_acceptance_rate_is_weighted_by_throughput() -> None:
    assert acceptance_rate([replica(0.9, 300.0), replica(0.5, 100.0), replica(None, 1e6)]) == pytest.approx(0.8)
    assert acceptance_rate([replica(0.9, 0.0), replica(0.5, 0.0)]) == pytest.approx(0.7)
    assert acceptance_rate([replica(None, 10.0)]) is None and acceptance_rate([]) is None


def test_coupling_reads_the_target_tier() -> None:
    target = [
        ReplicaLoad("target", "a", queue_depth=2, active_sessions=3, tokens_per_s=300.0, acceptance_rate=0.9),
        ReplicaLoad("target", "b", queue_depth=1, active_sessions=4, tokens_per_s=100.0, acceptance_rate=0.5),
    ]
    c = Coupling.of_target(target, draft_length=4, draft_tokens_per_s_per_replica=1000.0)
    assert (c.target_tokens_per_s, c.target_active_sessions, c.target_queue_depth) == (400.0, 7, 3)
    assert c.acceptance_rate == pytest.approx(0.8) and c.draft_length == 4
    assert c.draft_tokens_per_s_per_replica == 1000.0 and not c.idle
    assert Coupling.of_target([], 4).idle


# ---- settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,level",
    [(None, logging.INFO), ("debug", logging.DEBUG), (" WARNING ", logging.WARNING), ("error", logging.ERROR)],
)
def test_log_level_from_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str | None, level: int) -> None:
    if raw is None:
        monkeypatch.delenv("SPECDEC_OPERATOR_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("SPECDEC_OPERATOR_LOG_LEVEL", raw)
    assert OperatorConfig.from_env().logging_level == level


def test_an_unknown_log_level_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECDEC_OPERATOR_LOG_LEVEL", "verbose")
    with pytest.raises(ValueError, match="SPECDEC_OPERATOR_LOG_LEVEL"):
        OperatorConfig.from_env()


def test_the_operator_imports_no_torch() -> None:
    """The operator image has no torch: every operator module must import without it."""
    code = (
        "import sys, specdec_operator.__main__, specdec_operator.handlers\n"
        "sys.exit(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3] or 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
