"""What one reconcile pass decides, as pure functions; :mod:`.handlers` does the I/O.

* :func:`plan_tier`: one tier's replica count, status fields, scaling Event and problem,
  from its Deployment's replicas now and (when autoscaling) the policy's :class:`Decision`;
* :func:`decoder_status`: the resource's ``status`` (tiers, acceptance, conditions);
* :func:`conditions`: Kubernetes conditions that keep ``lastTransitionTime`` while the
  status stays the same.

Timestamps come in as ``stamp`` (an RFC 3339 string), so every function here is
deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .policy import Decision
from .spec import TierSpec

Wanted = Mapping[str, tuple[bool, str, str]]  # condition type -> (ok, reason, message)


@dataclass(frozen=True)
class Fault:
    """Something that keeps a decoder from working, said in its conditions and an Event."""

    reason: str  # condition/Event reason, e.g. SecretForbidden, Unschedulable
    message: str


# Pod states that a tier cannot leave on its own, by the reason Kubernetes gives.
STUCK_CONTAINER_REASONS = (
    "CreateContainerConfigError",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CrashLoopBackOff",
)


def pod_faults(tier: str, pods: Sequence[Mapping[str, Any]]) -> list[Fault]:
    """Faults read off a tier's pods: unschedulable, or a container that cannot start."""
    unschedulable: list[str] = []
    stuck: dict[str, str] = {}
    for pod in pods:
        status = pod.get("status") or {}
        for c in status.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                unschedulable.append(str(c.get("message") or "no node fits"))
        for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_CONTAINER_REASONS:
                stuck.setdefault(waiting["reason"], str(waiting.get("message") or waiting["reason"]))
    faults = []
    if unschedulable:
        faults.append(
            Fault("Unschedulable", f"{tier}: {len(unschedulable)} pod(s) cannot be scheduled: {unschedulable[0]}")
        )
    faults += [Fault(reason, f"{tier}: {message}") for reason, message in stuck.items()]
    return faults


@dataclass(frozen=True)
class TierPlan:
    """One tier's outcome of a reconcile pass."""

    replicas: int  # spec.replicas to apply to the tier's Deployment
    status: dict[str, Any]  # the tier's entry in status.tiers
    event: tuple[str, str] | None  # (reason, message) of a scaling Event, if it scales
    problem: str | None  # replicas that do not report, for Degraded


def current_replicas(live: Mapping[str, Any] | None, t: TierSpec) -> int:
    """The live Deployment's replica count; ``min_replicas`` when it has none (or is absent)."""
    return int(((live or {}).get("spec") or {}).get("replicas", t.min_replicas))


def ready_replicas(live: Mapping[str, Any] | None) -> int:
    return int(((live or {}).get("status") or {}).get("readyReplicas") or 0)


def plan_tier(
    t: TierSpec, current: int, ready: int, old_status: Mapping[str, Any], decision: Decision | None, stamp: str
) -> TierPlan:
    """The tier's replicas and status fields.

    Without a ``decision`` (create/update, autoscaling off or paused) the replica count is
    the current one brought within bounds, or ``min_replicas`` when autoscaling is off.
    With one, the decision's count, its observed load in status, and an Event if it scales.
    """
    assert decision is None or (t.autoscaling_enabled and t.operator_scales), (
        "decision for a tier that the operator does not autoscale"
    )
    status = dict(old_status)
    if not t.operator_scales:  # an HPA/KEDA object owns the count: report it as it is
        replicas, event, problem = current, None, None
    elif decision is None:
        replicas = t.min_replicas if not t.autoscaling_enabled else min(max(current, t.min_replicas), t.max_replicas)
        event = problem = None
    else:
        replicas, event = decision.desired, scaling_event(decision)
        o = decision.observed
        problem = f"{t.tier}: {o.missing} of {current} replicas not reporting" if o.missing and current else None
        if event is not None:
            status.update(lastScaleTime=stamp, lastScaleReason=event[1][:300])
        status.update(
            recommendedReplicas=decision.recommended,
            reportingReplicas=o.reporting,
            activeSessions=o.active_sessions,
            tokensPerSecond=round(o.tokens_per_s, 2),
            utilization=None if o.utilization is None else round(o.utilization, 3),
            queueDepth=None if o.queue_depth is None else round(o.queue_depth, 2),
        )
    status.update(desiredReplicas=replicas, readyReplicas=ready)
    return TierPlan(replicas=replicas, status=status, event=event, problem=problem)


def scaling_event(d: Decision) -> tuple[str, str] | None:
    """(reason, message) of the Event a decision that changes the count posts; else None."""
    if d.desired == d.current:
        return None
    reason = "ScaledUp" if d.desired > d.current else "ScaledDown"
    return reason, f"{d.tier}: {d.current} -> {d.desired} replicas: {d.reason}"


def decoder_status(
    generation: int | None,
    tiers: Mapping[str, Mapping[str, Any]],
    decisions: Sequence[Decision],
    problems: Sequence[str],
    old_conditions: Sequence[Mapping[str, Any]],
    stamp: str,
    faults: Sequence[Fault] = (),
) -> dict[str, Any]:
    """The resource's status: per-tier fields, acceptance rate, Ready/Scaling/Degraded.

    ``problems`` degrade the decoder; ``faults`` too, and their reason is the conditions'.
    """
    acceptance = [
        d.observed.acceptance_rate for d in decisions if d.tier == "target" and d.observed.acceptance_rate is not None
    ]
    scaling = [f"{d.tier} {d.current}->{d.desired}" for d in decisions if d.desired != d.current]
    not_ready = [tier for tier, s in tiers.items() if s["desiredReplicas"] > 0 and s["readyReplicas"] < 1]
    status: dict[str, Any] = {"observedGeneration": generation, "tiers": dict(tiers)}
    if acceptance:
        status["acceptanceRate"] = round(acceptance[0], 3)
    said = [f.message for f in faults]
    degraded = [*said, *problems]
    status["conditions"] = conditions(
        old_conditions,
        {
            "Ready": (
                not not_ready,
                "TiersReady" if not not_ready else faults[0].reason if faults else "TiersNotReady",
                "every tier has a ready replica"
                if not not_ready
                else "; ".join(["no ready replica in: " + ", ".join(not_ready), *said]),
            ),
            "Scaling": (
                bool(scaling),
                "Scaling" if scaling else "Stable",
                "; ".join(scaling) or "replica counts match the load",
            ),
            "Degraded": (
                bool(degraded),
                faults[0].reason if faults else "Degraded" if problems else "Healthy",
                "; ".join(degraded) or "all replicas report load",
            ),
        },
        stamp,
        generation,
    )
    return status


def invalid_spec_conditions(
    old: Sequence[Mapping[str, Any]], message: str, stamp: str, generation: int | None = None
) -> list[dict[str, Any]]:
    """Conditions of a resource whose spec does not parse."""
    return conditions(
        old,
        {
            "Ready": (False, "InvalidSpec", message),
            "Scaling": (False, "InvalidSpec", message),
            "Degraded": (True, "InvalidSpec", message),
        },
        stamp,
        generation,
    )


def new_faults(old: Sequence[Mapping[str, Any]], faults: Sequence[Fault]) -> list[Fault]:
    """The faults the old Degraded condition did not already say (each gets one Event)."""
    before = next((c for c in old or [] if c.get("type") == "Degraded"), {})
    said = str(before.get("message") or "") if before.get("status") == "True" else ""
    return [f for f in faults if f.message not in said]


def conditions(
    old: Sequence[Mapping[str, Any]], new: Wanted, stamp: str, generation: int | None = None
) -> list[dict[str, Any]]:
    """Conditions with lastTransitionTime kept while the status does not change; each
    carries the ``generation`` of the spec it was computed from (observedGeneration)."""
    before = {c.get("type"): c for c in old or []}
    out = []
    for kind, (ok, reason, message) in new.items():
        status = "True" if ok else "False"
        prev = before.get(kind) or {}
        since = prev.get("lastTransitionTime") if prev.get("status") == status else None
        cond = {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message[:1000],
            "lastTransitionTime": since or stamp,
        }
        if generation is not None:
            cond["observedGeneration"] = generation
        out.append(cond)
    return out
