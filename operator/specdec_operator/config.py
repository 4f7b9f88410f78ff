"""Operator-wide settings, from the environment (the Helm chart sets them)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@dataclass(frozen=True)
class OperatorConfig:
    api_url: str | None  # SPECDEC_OPERATOR_API_URL: plain API URL (dev/tests), else in-cluster/kubeconfig
    interval_s: float  # SPECDEC_OPERATOR_INTERVAL_S: autoscaling / drift timer period
    default_redis_url: str | None  # SPECDEC_OPERATOR_REDIS_URL: Redis for resources that name none
    heartbeat_max_age_s: float  # SPECDEC_OPERATOR_HEARTBEAT_MAX_AGE_S: older heartbeats are ignored
    namespaces: tuple[str, ...]  # SPECDEC_OPERATOR_NAMESPACES: comma list; empty = all namespaces
    peering: str | None  # SPECDEC_OPERATOR_PEERING: kopf peering object; empty = standalone
    priority: int  # SPECDEC_OPERATOR_PRIORITY: peering priority; unset = from the pod name
    liveness: str | None  # SPECDEC_OPERATOR_LIVENESS: e.g. http://0.0.0.0:8080/healthz
    log_level: str  # SPECDEC_OPERATOR_LOG_LEVEL: debug | info (default) | warning | error
    peering_lifetime_s: int = 30  # SPECDEC_OPERATOR_PEERING_LIFETIME_S: a silent peer is dead after this
    metrics_port: int = 0  # SPECDEC_OPERATOR_METRICS_PORT: Prometheus /metrics on 0.0.0.0:port; 0 = off
    run_as_user: int | None = (
        10001  # SPECDEC_OPERATOR_RUN_AS_USER: tiers' UID/GID/fsGroup; empty = the platform's (OpenShift)
    )
    # SPECDEC_OPERATOR_REDIS_URL_SECRET[_KEY] (key default "url"): a Secret holding the default URL
    # with its password, which the tiers of a resource naming no Redis read by secretKeyRef (so it
    # must exist in that resource's namespace); without it they get the URL minus its password.
    default_redis_secret: tuple[str, str] | None = None
    # SPECDEC_OPERATOR_KV_REDIS_URL_SECRET[_KEY]: likewise the default KV chunks' server
    default_kv_redis_secret: tuple[str, str] | None = None

    @classmethod
    def from_env(cls) -> OperatorConfig:
        env = os.environ
        interval = float(env.get("SPECDEC_OPERATOR_INTERVAL_S", "15"))
        if interval <= 0:
            raise ValueError("SPECDEC_OPERATOR_INTERVAL_S must be > 0")
        log_level = env.get("SPECDEC_OPERATOR_LOG_LEVEL", "info").strip().lower() or "info"
        if log_level not in LOG_LEVELS:
            raise ValueError(f"SPECDEC_OPERATOR_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")
        return cls(
            api_url=env.get("SPECDEC_OPERATOR_API_URL") or None,
            interval_s=interval,
            default_redis_url=env.get("SPECDEC_OPERATOR_REDIS_URL") or None,
            heartbeat_max_age_s=float(env.get("SPECDEC_OPERATOR_HEARTBEAT_MAX_AGE_S", "10")),
            namespaces=tuple(n.strip() for n in env.get("SPECDEC_OPERATOR_NAMESPACES", "").split(",") if n.strip()),
            peering=env.get("SPECDEC_OPERATOR_PEERING") or None,
            priority=(
                int(env["SPECDEC_OPERATOR_PRIORITY"])
                if env.get("SPECDEC_OPERATOR_PRIORITY")
                else name_priority(env.get("POD_ID") or env.get("POD_NAME") or socket.gethostname())
            ),
            liveness=env.get("SPECDEC_OPERATOR_LIVENESS") or None,
            log_level=log_level,
            peering_lifetime_s=int(env.get("SPECDEC_OPERATOR_PEERING_LIFETIME_S") or 30),
            metrics_port=int(env.get("SPECDEC_OPERATOR_METRICS_PORT") or 0),
            run_as_user=int(uid) if (uid := env.get("SPECDEC_OPERATOR_RUN_AS_USER", "10001")) else None,
            default_redis_secret=_secret_ref(env, "SPECDEC_OPERATOR_REDIS_URL_SECRET"),
            default_kv_redis_secret=_secret_ref(env, "SPECDEC_OPERATOR_KV_REDIS_URL_SECRET"),
        )

    @property
    def logging_level(self) -> int:
        """``log_level`` as a :mod:`logging` level number."""
        return LOG_LEVELS[self.log_level]


def _secret_ref(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(Secret name, key) from ``name`` and ``name``_KEY (default "url"); None when unset."""
    secret = env.get(name, "").strip()
    return (secret, env.get(f"{name}_KEY", "").strip() or "url") if secret else None


def name_priority(name: str) -> int:
    """A peering priority from a pod name: distinct pods get distinct priorities.

    kopf pauses every operator that sees a peer of the same priority, so the replicas of
    one Deployment (all given the same environment) must not share one. A stable hash of
    the pod name, in [1, 2**31), collides for two pods once in about two billion.
    """
    return 1 + int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % (2**31 - 1)
