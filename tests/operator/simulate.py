"""A small discrete-time model of the three tiers, driven by the real policy.

Demand is the target tier's verification work in tokens/s. Each tier turns it into its
own load: the target tier verifies it, the draft tier must propose ``k`` tokens per
verification step, the coordinator holds one session per 30 tok/s of demand. Replicas
take ``startup_s`` to become ready; a ready replica publishes a heartbeat like the
services do (utilization, queue depth, tokens/s, sessions), optionally with noise; a
"silent" replica keeps serving but stops publishing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from specdec_operator.policy import Coupling, Decision, History, ReplicaLoad, TierPolicy, decide

ACCEPTANCE = 0.7
DRAFT_LENGTH = 4
TOKENS_PER_SESSION_S = 30.0


@dataclass
class TierModel:
    name: str
    policy: TierPolicy
    capacity: float  # work units/s one ready replica handles at full batch
    startup_s: float  # time from scheduling to ready
    target: float  # per-replica utilization the SLO asks to stay under
    replicas: int = 1
    pending: list[float] = field(default_factory=list)  # ready-at times of starting replicas


@dataclass
class TierResult:
    replica_minutes: float
    fixed_replica_minutes: float
    fixed_replicas: int
    over_target_fraction: float
    decisions: list[Decision]
    replicas: list[int]  # desired count per tick
    ready: list[int]  # ready count per tick
    utilization: list[float]  # true per-replica load / capacity per tick

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.replica_minutes / self.fixed_replica_minutes

    def changes(self) -> list[tuple[int, int]]:
        """(tick, delta) for every change of the desired count."""
        return [
            (i, self.replicas[i] - self.replicas[i - 1])
            for i in range(1, len(self.replicas))
            if self.replicas[i] != self.replicas[i - 1]
        ]


def default_tiers(scale_down_window_s: float = 300.0) -> dict[str, TierModel]:
    common = dict(
        headroom=0.1, tolerance_down=0.1, scale_down_window_s=scale_down_window_s, max_step_up=4, max_step_down=1
    )
    return {
        "target": TierModel(
            "target",
            TierPolicy(min_replicas=1, max_replicas=40, target_utilization=0.8, target_queue_depth=16, **common),
            capacity=400.0,
            startup_s=60.0,
            target=0.8,
        ),
        "draft": TierModel(
            "draft",
            TierPolicy(
                min_replicas=1,
                max_replicas=40,
                target_utilization=0.8,
                target_queue_depth=16,
                scale_to_zero=True,
                **common,
            ),
            capacity=1500.0,
            startup_s=30.0,
            target=0.8,
        ),
        "coordinator": TierModel(
            "coordinator",
            TierPolicy(
                min_replicas=1,
                max_replicas=20,
                target_utilization=None,
                target_queue_depth=None,
                target_active_sessions=32,
                **common,
            ),
            capacity=32.0,
            startup_s=10.0,
            target=1.0,
        ),
    }


def tier_demand(name: str, demand_tps: float) -> float:
    """Demand in the tier's own work unit (tokens/s, draft tokens/s, sessions)."""
    if name == "target":
        return demand_tps
    if name == "draft":
        a, k = ACCEPTANCE, DRAFT_LENGTH
        return demand_tps / ((1 - a ** (k + 1)) / (1 - a)) * k
    return demand_tps / TOKENS_PER_SESSION_S


def simulate(
    trace: Callable[[float], float],
    duration_s: float,
    *,
    tick_s: float = 15.0,
    tiers: dict[str, TierModel] | None = None,
    noise: float = 0.0,
    seed: int = 0,
    silent: Callable[[str, int, float], bool] = lambda tier, i, t: False,
) -> dict[str, TierResult]:
    """Run ``trace`` (demand tokens/s at time t) through the policy for ``duration_s``."""
    rng = random.Random(seed)
    tiers = tiers or default_tiers()
    histories = {name: History(started_at=0.0) for name in tiers}
    out: dict[str, dict] = {
        name: dict(decisions=[], replicas=[], ready=[], util=[], over=0, rm=0.0, peak=0.0) for name in tiers
    }
    n_ticks = int(duration_s / tick_s)
    for step in range(n_ticks):
        now = step * tick_s
        demand = max(0.0, trace(now) * (1 + rng.gauss(0, noise) if noise else 1))
        loads: dict[str, list[ReplicaLoad]] = {}
        for name, m in tiers.items():
            m.pending = [t for t in m.pending if t > now]
            ready = max(0, m.replicas - len(m.pending))
            work = tier_demand(name, demand)
            cap = ready * m.capacity
            true_util = work / cap if cap else (math.inf if work > 0 else 0.0)
            per = work / ready if ready else 0.0
            sessions = per if name == "coordinator" else per / TOKENS_PER_SESSION_S
            # Sessions wait for a batch slot in proportion to the overload.
            waiting = sessions * max(0.0, 1.0 - 1.0 / true_util) if true_util > 0 else 0.0
            loads[name] = [
                ReplicaLoad(
                    tier=name,
                    replica_id=f"{name}-{i}",
                    queue_depth=int(round(waiting)),
                    active_sessions=int(round(sessions)),
                    batch_utilization=min(1.0, true_util) if name != "coordinator" else 0.0,
                    tokens_per_s=per if name != "coordinator" else 0.0,
                    acceptance_rate=ACCEPTANCE if name != "coordinator" else None,
                    heartbeat_at=now,
                )
                for i in range(ready)
                if not silent(name, i, now)
            ]
            o = out[name]
            o["util"].append(true_util)
            o["over"] += true_util > m.target + 1e-9
            o["peak"] = max(o["peak"], work)
        target_loads = loads["target"]
        coupling = Coupling(
            target_tokens_per_s=sum(x.tokens_per_s for x in target_loads),
            target_active_sessions=sum(x.active_sessions for x in target_loads),
            target_queue_depth=sum(x.queue_depth for x in target_loads),
            draft_length=DRAFT_LENGTH,
            acceptance_rate=ACCEPTANCE,
            draft_tokens_per_s_per_replica=tiers["draft"].capacity,
        )
        for name, m in tiers.items():
            d = decide(
                name, m.policy, loads[name], m.replicas, histories[name], now, coupling if name == "draft" else None
            )
            if d.desired > m.replicas:
                m.pending += [now + m.startup_s] * (d.desired - m.replicas)
            elif d.desired < m.replicas:
                drop = m.replicas - d.desired  # starting replicas are removed first
                m.pending = sorted(m.pending)[: max(0, len(m.pending) - drop)]
            m.replicas = d.desired
            o = out[name]
            o["decisions"].append(d)
            o["replicas"].append(m.replicas)
            o["ready"].append(m.replicas - len([t for t in m.pending if t > now]))
            o["rm"] += m.replicas * tick_s / 60.0
    results = {}
    for name, m in tiers.items():
        o = out[name]
        fixed = max(1, math.ceil(o["peak"] / (m.capacity * m.target) - 1e-9))
        results[name] = TierResult(
            replica_minutes=o["rm"],
            fixed_replica_minutes=fixed * n_ticks * tick_s / 60.0,
            fixed_replicas=fixed,
            over_target_fraction=o["over"] / n_ticks,
            decisions=o["decisions"],
            replicas=o["replicas"],
            ready=o["ready"],
            utilization=o["util"],
        )
    return results


# ---- traces (demand in target tokens/s) ---------------------------------------------


def step_trace(low: float, high: float, at_s: float) -> Callable[[float], float]:
    return lambda t: high if t >= at_s else low


def spike_trace(base: float, peak: float, start_s: float, length_s: float) -> Callable[[float], float]:
    return lambda t: peak if start_s <= t < start_s + length_s else base


def diurnal_trace(low: float, peak: float, period_s: float = 86400.0) -> Callable[[float], float]:
    return lambda t: low + (peak - low) * (1 - math.cos(2 * math.pi * t / period_s)) / 2
