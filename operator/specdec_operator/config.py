"""Operator-wide settings, from the environment (the Helm chart sets them)."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorConfig:
    api_url: str | None          # SPECDEC_OPERATOR_API_URL: plain API URL (dev/tests), else in-cluster/kubeconfig
    interval_s: float            # SPECDEC_OPERATOR_INTERVAL_S: autoscaling / drift timer period
    default_redis_url: str | None  # SPECDEC_OPERATOR_REDIS_URL: Redis for resources that name none
    heartbeat_max_age_s: float   # SPECDEC_OPERATOR_HEARTBEAT_MAX_AGE_S: older heartbeats are ignored
    namespaces: tuple[str, ...]  # SPECDEC_OPERATOR_NAMESPACES: comma list; empty = all namespaces
    peering: str | None          # SPECDEC_OPERATOR_PEERING: kopf peering object; empty = standalone
    priority: int                # SPECDEC_OPERATOR_PRIORITY: peering priority of this pod
    liveness: str | None         # SPECDEC_OPERATOR_LIVENESS: e.g. http://0.0.0.0:8080/healthz

    @classmethod
    def from_env(cls) -> "OperatorConfig":
        env = os.environ
        interval = float(env.get("SPECDEC_OPERATOR_INTERVAL_S", "15"))
        if interval <= 0:
            raise ValueError("SPECDEC_OPERATOR_INTERVAL_S must be > 0")
        return cls(
            api_url=env.get("SPECDEC_OPERATOR_API_URL") or None,
            interval_s=interval,
            default_redis_url=env.get("SPECDEC_OPERATOR_REDIS_URL") or None,
            heartbeat_max_age_s=float(env.get("SPECDEC_OPERATOR_HEARTBEAT_MAX_AGE_S", "10")),
            namespaces=tuple(n.strip() for n in env.get("SPECDEC_OPERATOR_NAMESPACES", "").split(",")
                             if n.strip()),
            peering=env.get("SPECDEC_OPERATOR_PEERING") or None,
            priority=int(env.get("SPECDEC_OPERATOR_PRIORITY", "0")),
            liveness=env.get("SPECDEC_OPERATOR_LIVENESS") or None,
        )
