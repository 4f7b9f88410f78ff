"""Operator-wide settings, from the environment (the Helm chart sets them)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}


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
    log_level: str               # SPECDEC_OPERATOR_LOG_LEVEL: debug | info (default) | warning | error

    @classmethod
    def from_env(cls) -> "OperatorConfig":
        env = os.environ
        interval = float(env.get("SPECDEC_OPERATOR_INTERVAL_S", "15"))
        if interval <= 0:
            raise ValueError("SPECDEC_OPERATOR_INTERVAL_S must be > 0")
        log_level = env.get("SPECDEC_OPERATOR_LOG_LEVEL", "info").strip().lower() or "info"
        if log_level not in LOG_LEVELS:
            raise ValueError(f"SPECDEC_OPERATOR_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, "
                             f"not {log_level!r}")
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
            log_level=log_level,
        )

    @property
    def logging_level(self) -> int:
        """``log_level`` as a :mod:`logging` level number."""
        return LOG_LEVELS[self.log_level]
