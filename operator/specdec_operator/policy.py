"""The autoscaling policy: a pure function from published load to a replica count.

Nothing here talks to Kubernetes or Redis. The operator feeds it the replicas' latest
heartbeats (see :mod:`specdec_operator.load`) and the tier's current replica count on
every timer tick; the simulation tests feed it synthetic traces.

The rule is the Kubernetes HPA rule, made explicit:

* per metric, ``recommended = ceil(total_load / setpoint)`` where
  ``setpoint = target_per_replica * (1 - headroom)``; the metric only moves the count when
  ``total / (current * setpoint)`` leaves the tolerance band ``[1 - tol_down, 1 + tol_up]``;
  the tier's recommendation is the largest over its metrics;
* a replica that stopped reporting is *missing*, never zero load: for a scale-up it adds
  nothing (so it cannot block one), for a scale-down it counts as loaded at the setpoint
  (so it cannot cause one). If no replica reports at all the count is held;
* stabilization: scale up to the *smallest* recommendation of the last
  ``scale_up_window_s`` (0 = at once), scale down to the *largest* recommendation of the
  last ``scale_down_window_s`` and only once that much history has been seen;
* each decision moves at most ``max_step_up`` / ``max_step_down`` replicas and stays
  within ``[min_replicas, max_replicas]`` (``min`` may drop to 0 for an idle draft tier
  with ``scale_to_zero``);
* the draft tier is coupled to the target tier: it must propose ``draft_length`` tokens
  for every verification step the target tier runs, so its capacity follows
  ``target tokens/s / tokens per step * draft_length``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

TIERS = ("coordinator", "draft", "target")
Direction = Literal["up", "down", "none"]


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's latest heartbeat, as published in Redis by the services."""

    tier: str
    replica_id: str
    queue_depth: int = 0  # pending verify/propose items on this replica
    active_sessions: int = 0  # sessions this replica holds state for
    batch_utilization: float = 0.0  # fraction of batch capacity used, 0..1
    tokens_per_s: float = 0.0  # tokens produced (draft) or verified (target) per second
    acceptance_rate: float | None = None  # fraction of draft tokens accepted; None = unknown
    heartbeat_at: float = 0.0  # unix seconds of the heartbeat


@dataclass(frozen=True)
class TierPolicy:
    """Autoscaling settings of one tier (the CRD's ``spec.<tier>.autoscaling``)."""

    min_replicas: int = 1
    max_replicas: int = 10
    target_utilization: float | None = 0.8  # batch_utilization per replica to stay under
    target_queue_depth: float | None = 8.0  # pending items per replica to stay under
    target_active_sessions: float | None = None  # sessions per replica to stay under
    headroom: float = 0.1  # size for target*(1-headroom): room for replicas to start
    tolerance_up: float = 0.0  # ratio above 1 tolerated before scaling up
    tolerance_down: float = 0.1  # ratio below 1 tolerated before scaling down
    scale_up_window_s: float = 0.0  # stabilization window for scale-up
    scale_down_window_s: float = 300.0  # stabilization window for scale-down
    max_step_up: int = 4  # most replicas added by one decision
    max_step_down: int = 1  # most replicas removed by one decision
    scale_to_zero: bool = False  # draft tier only: 0 replicas while idle

    def __post_init__(self) -> None:
        problems = []
        if self.min_replicas < 0:
            problems.append("min_replicas must be >= 0")
        if self.max_replicas < max(self.min_replicas, 1):
            problems.append("max_replicas must be >= max(min_replicas, 1)")
        for name in ("target_utilization", "target_queue_depth", "target_active_sessions"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0")
        if self.target_utilization is not None and self.target_utilization > 1:
            problems.append("target_utilization must be <= 1")
        if not 0 <= self.headroom < 1:
            problems.append("headroom must be in [0, 1)")
        if self.tolerance_up < 0 or not 0 <= self.tolerance_down < 1:
            problems.append("tolerances must be >= 0 (tolerance_down < 1)")
        if self.scale_up_window_s < 0 or self.scale_down_window_s < 0:
            problems.append("stabilization windows must be >= 0")
        if self.max_step_up < 1 or self.max_step_down < 1:
            problems.append("max steps must be >= 1")
        if problems:
            raise ValueError("invalid TierPolicy: " + "; ".join(problems))

    def metrics(self) -> list[tuple[str, float]]:
        """(ReplicaLoad field, per-replica target) for each enabled metric."""
        pairs = [
            ("batch_utilization", self.target_utilization),
            ("queue_depth", self.target_queue_depth),
            ("active_sessions", self.target_active_sessions),
        ]
        return [(name, float(t)) for name, t in pairs if t is not None]


@dataclass(frozen=True)
class Coupling:
    """What the draft tier must keep up with: the target tier's verification rate."""

    target_tokens_per_s: float  # tokens/s verified by the whole target tier
    target_active_sessions: int  # sessions the target tier holds (0 = idle)
    target_queue_depth: int  # verify items waiting in the target tier
    draft_length: int  # k: draft tokens proposed per verification step
    acceptance_rate: float | None = None  # tier-wide; None = assume 0.5
    draft_tokens_per_s_per_replica: float | None = None  # one draft replica's capacity

    def tokens_per_step(self) -> float:
        """Expected tokens committed per verify step: (1 - a^(k+1)) / (1 - a)."""
        a = 0.5 if self.acceptance_rate is None else min(max(self.acceptance_rate, 0.0), 0.999)
        return (1 - a ** (self.draft_length + 1)) / (1 - a)

    def required_draft_tokens_per_s(self) -> float:
        steps_per_s = self.target_tokens_per_s / self.tokens_per_step()
        return steps_per_s * self.draft_length

    @property
    def idle(self) -> bool:
        return self.target_tokens_per_s <= 0 and self.target_active_sessions <= 0 and self.target_queue_depth <= 0

    @classmethod
    def of_target(
        cls, target: Sequence[ReplicaLoad], draft_length: int, draft_tokens_per_s_per_replica: float | None = None
    ) -> Coupling:
        """The coupling read off the target tier's heartbeats."""
        return cls(
            target_tokens_per_s=sum(x.tokens_per_s for x in target),
            target_active_sessions=sum(x.active_sessions for x in target),
            target_queue_depth=sum(x.queue_depth for x in target),
            draft_length=draft_length,
            acceptance_rate=acceptance_rate(target),
            draft_tokens_per_s_per_replica=draft_tokens_per_s_per_replica,
        )


@dataclass(frozen=True)
class Observed:
    """Tier-wide figures from one scan, shown in status and events."""

    reporting: int  # replicas with a live heartbeat
    missing: int  # replicas that exist but do not report
    utilization: float | None  # mean batch_utilization of the reporting replicas
    queue_depth: float | None  # mean queue depth of the reporting replicas
    active_sessions: int  # sum over reporting replicas
    tokens_per_s: float  # sum over reporting replicas
    acceptance_rate: float | None  # tokens/s-weighted mean, None if unknown


@dataclass(frozen=True)
class Recommendation:
    replicas: int  # raw recommendation, clamped to bounds
    reason: str
    observed: Observed
    floor: int  # effective minimum (0 when scaled to zero)


@dataclass(frozen=True)
class Decision:
    tier: str
    current: int
    desired: int
    recommended: int
    direction: Direction
    reason: str
    observed: Observed


@dataclass
class History:
    """Recent recommendations of one tier, for the stabilization windows."""

    started_at: float  # when this history began (monotonic clock, s)
    entries: deque[tuple[float, int]] = field(default_factory=deque)  # (monotonic s, replicas)

    def add(self, now: float, replicas: int, keep_s: float) -> None:
        self.entries.append((now, replicas))
        while self.entries and self.entries[0][0] < now - keep_s:
            self.entries.popleft()

    def within(self, now: float, window_s: float) -> list[int]:
        return [r for t, r in self.entries if t >= now - window_s]


def acceptance_rate(loads: Sequence[ReplicaLoad]) -> float | None:
    """Tier-wide acceptance: the replicas' rates weighted by their tokens/s.

    A replica with no throughput still counts, with a tiny weight (so an idle tier has a
    rate); None when no replica reports one.
    """
    rated = [(x.acceptance_rate, max(x.tokens_per_s, 1e-9)) for x in loads if x.acceptance_rate is not None]
    if not rated:
        return None
    return sum(a * w for a, w in rated) / sum(w for _, w in rated)


def observe(loads: Sequence[ReplicaLoad], current: int) -> Observed:
    n = len(loads)
    return Observed(
        reporting=n,
        missing=max(0, current - n),
        utilization=(sum(x.batch_utilization for x in loads) / n) if n else None,
        queue_depth=(sum(x.queue_depth for x in loads) / n) if n else None,
        active_sessions=sum(x.active_sessions for x in loads),
        tokens_per_s=sum(x.tokens_per_s for x in loads),
        acceptance_rate=acceptance_rate(loads),
    )


def recommend(
    policy: TierPolicy, loads: Sequence[ReplicaLoad], current: int, coupling: Coupling | None = None
) -> Recommendation:
    """The raw (unstabilized) replica count this tier's load asks for, with the reason."""
    obs = observe(loads, current)
    idle_own = all(x.queue_depth == 0 and x.active_sessions == 0 and x.batch_utilization == 0 for x in loads)
    floor = policy.min_replicas
    if policy.scale_to_zero and coupling is not None and coupling.idle and idle_own:
        floor = 0
    candidates: list[tuple[int, str]] = []
    if obs.reporting == 0 and current > 0:
        candidates.append((current, "no replica reporting: holding"))
    else:
        for name, target in policy.metrics():
            setpoint = target * (1 - policy.headroom)
            total = sum(float(getattr(x, name)) for x in loads)
            # Missing replicas count as loaded at the setpoint when judging a scale-down.
            total_down = total + obs.missing * setpoint
            candidates.append(_band(policy, current, total, total_down, setpoint, name))
    if coupling is not None:
        capacity = coupling.draft_tokens_per_s_per_replica
        if capacity is None:
            used = sum(x.batch_utilization for x in loads)
            if used > 0.05:
                capacity = obs.tokens_per_s / used  # tokens/s one fully used replica makes
        required = coupling.required_draft_tokens_per_s()
        if capacity and capacity > 0 and policy.target_utilization is not None:
            setpoint = capacity * policy.target_utilization * (1 - policy.headroom)
            replicas, why = _band(policy, current, required, required, setpoint, "coupled draft tokens/s")
            candidates.append(
                (
                    replicas,
                    f"{why} (target tier verifies {coupling.target_tokens_per_s:.0f} tok/s, k={coupling.draft_length})",
                )
            )
        if not coupling.idle:
            candidates.append((max(1, policy.min_replicas), "target tier is busy"))
    if not candidates:
        candidates.append((current, "no metric"))
    replicas, reason = max(candidates, key=lambda c: c[0])
    replicas = min(max(replicas, floor), policy.max_replicas)
    if replicas == 0:
        reason = "idle: draft tier scaled to zero (coordinator decodes without drafts)"
    return Recommendation(replicas=replicas, reason=reason, observed=obs, floor=floor)


def _band(
    policy: TierPolicy, current: int, total: float, total_down: float, setpoint: float, name: str
) -> tuple[int, str]:
    """One metric's recommendation with the tolerance band.

    Scale up when the load per replica exceeds ``setpoint * (1 + tolerance_up)``, to the
    count that brings it back to the setpoint. Scale down only to a count at which the
    load per replica stays under ``setpoint * (1 - tolerance_down)``, so that ordinary
    noise after a scale-down cannot trigger the next scale-up (no flapping).
    """
    want_up = math.ceil(total / setpoint - 1e-9)
    if current == 0:
        return want_up, f"{name} total {total:.2f} at 0 replicas"
    want_down = math.ceil(total_down / (setpoint * (1 - policy.tolerance_down)) - 1e-9)
    if want_up > current and total / (current * setpoint) > 1 + policy.tolerance_up:
        return want_up, f"{name} {total / current:.2f}/replica over setpoint {setpoint:.2f}"
    if want_down < current:
        return want_down, (
            f"{name} {total_down / current:.2f}/replica; {want_down} replicas "
            f"stay under {setpoint * (1 - policy.tolerance_down):.2f}"
        )
    return current, f"{name} {total / current:.2f}/replica within tolerance of {setpoint:.2f}"


def decide(
    tier: str,
    policy: TierPolicy,
    loads: Sequence[ReplicaLoad],
    current: int,
    history: History,
    now: float,
    coupling: Coupling | None = None,
) -> Decision:
    """One autoscaling step: recommendation, then stabilization windows and step caps.

    ``now`` is a monotonic clock in seconds, the clock of ``history``; ``history`` is
    updated in place; everything else is an input.
    """
    rec = recommend(policy, loads, current, coupling)
    keep = max(policy.scale_up_window_s, policy.scale_down_window_s) + 1.0
    history.add(now, rec.replicas, keep)
    up = min(history.within(now, policy.scale_up_window_s) or [rec.replicas])
    down = max(history.within(now, policy.scale_down_window_s) or [rec.replicas])
    direction: Direction = "none"
    desired, reason = current, rec.reason
    if current > policy.max_replicas:
        desired, direction, reason = policy.max_replicas, "down", "above maxReplicas"
    elif current < rec.floor:
        desired, direction, reason = rec.floor, "up", "below minReplicas"
    elif up > current:
        desired, direction = min(up, current + policy.max_step_up), "up"
    elif down < current:
        if now - history.started_at >= policy.scale_down_window_s:
            desired, direction = max(down, current - policy.max_step_down), "down"
        else:
            reason = f"{reason}; scale-down waits for a full {policy.scale_down_window_s:g}s window"
    elif rec.replicas < current:
        reason = f"{reason}; stabilizing (max of last {policy.scale_down_window_s:g}s is {down})"
    return Decision(
        tier=tier,
        current=current,
        desired=desired,
        recommended=rec.replicas,
        direction=direction,
        reason=reason,
        observed=rec.observed,
    )
