"""Desired Deployments, Services and PodDisruptionBudgets of one ``SpeculativeDecoder``.

Pure functions from the parsed spec to manifests; the handlers apply them.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

from .spec import GROUP, KIND, VERSION, DecoderSpec, TierSpec

MANAGED_BY = "specdec-operator"


def redis_prefix(namespace: str, name: str) -> str:
    """Key prefix of one decoder's replicas in Redis (SPECDEC_REDIS_PREFIX)."""
    return f"specdec:{namespace}.{name}:"


def child_name(name: str, tier: str) -> str:
    return f"{name}-{tier}"


def labels(name: str, tier: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "specdec",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": tier,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        f"{GROUP}/decoder": name,
    }


def selector(name: str, tier: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": name, "app.kubernetes.io/component": tier,
            f"{GROUP}/decoder": name}


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    meta = owner["metadata"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def _env(spec: DecoderSpec, t: TierSpec, namespace: str, name: str,
         default_redis_url: str | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if spec.redis_secret is not None:
        secret, key = spec.redis_secret
        env.append({"name": "SPECDEC_REDIS_URL",
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    elif spec.redis_url or default_redis_url:
        env.append({"name": "SPECDEC_REDIS_URL", "value": spec.redis_url or default_redis_url})
    env += [
        {"name": "SPECDEC_REDIS_PREFIX", "value": redis_prefix(namespace, name)},
        {"name": "SPECDEC_MODEL", "value": spec.model},
        {"name": "SPECDEC_DRAFTER", "value": spec.drafter},
        {"name": "SPECDEC_PORT", "value": str(t.port)},
        {"name": "SPECDEC_DEVICE", "value": t.device},
    ]
    if t.dtype:
        env.append({"name": "SPECDEC_DTYPE", "value": t.dtype})
    if spec.tracing_endpoint:
        env.append({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": spec.tracing_endpoint})
    env += [
        {"name": "OTEL_SERVICE_NAME", "value": f"specdec-{t.tier}"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        # Bind every interface; register the pod IP in Redis so the coordinator can dial it.
        {"name": "SPECDEC_HOST", "value": "0.0.0.0"},
        {"name": "SPECDEC_ADVERTISE_HOST", "value": "$(POD_IP)"},
        {"name": "HOME", "value": "/home/specdec"},
        {"name": "HF_HOME", "value": "/home/specdec/.cache/huggingface"},
    ]
    return env + copy.deepcopy(t.env)


def deployment(owner: Mapping[str, Any], spec: DecoderSpec, tier: str, replicas: int,
               default_redis_url: str | None = None) -> dict[str, Any]:
    """The tier's Deployment with ``replicas`` replicas."""
    meta = owner["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    t = spec.tiers[tier]
    resources = copy.deepcopy(dict(t.resources))
    node_selector = dict(t.node_selector)
    if t.gpu.count:
        for kind in ("limits", "requests"):
            resources.setdefault(kind, {})[t.gpu.resource_name] = t.gpu.count
        if t.gpu.type:
            node_selector[t.gpu.node_label] = t.gpu.type
    probe = {"grpc": {"port": t.port}}
    container: dict[str, Any] = {
        "name": tier,
        "image": t.image,
        "command": ["specdec", "serve", tier],
        "ports": [{"name": "grpc", "containerPort": t.port, "protocol": "TCP"}],
        "env": _env(spec, t, namespace, name, default_redis_url),
        "resources": resources,
        # Loading a model can take minutes: the startup probe allows 10 min.
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": 120},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "cache", "mountPath": "/home/specdec/.cache"}],
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "securityContext": {"runAsNonRoot": True, "fsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
        "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}],
        "terminationGracePeriodSeconds": 30,
    }
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if t.tolerations:
        pod_spec["tolerations"] = copy.deepcopy(t.tolerations)
    if t.affinity:
        pod_spec["affinity"] = copy.deepcopy(dict(t.affinity))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": child_name(name, tier), "namespace": namespace,
                     "labels": labels(name, tier), "ownerReferences": [owner_reference(owner)]},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(name, tier)},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels(name, tier)}, "spec": pod_spec},
        },
    }


def service(owner: Mapping[str, Any], spec: DecoderSpec, tier: str) -> dict[str, Any]:
    """ClusterIP for the coordinator (the public API); headless for the inner tiers."""
    meta = owner["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    t = spec.tiers[tier]
    svc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": child_name(name, tier), "namespace": namespace,
                     "labels": labels(name, tier), "ownerReferences": [owner_reference(owner)]},
        "spec": {"selector": selector(name, tier),
                 "ports": [{"name": "grpc", "port": t.port, "targetPort": "grpc",
                            "protocol": "TCP", "appProtocol": "grpc"}]},
    }
    if tier != "coordinator":
        svc["spec"]["clusterIP"] = "None"
    return svc


def pdb(owner: Mapping[str, Any], spec: DecoderSpec, tier: str) -> dict[str, Any]:
    meta = owner["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": child_name(name, tier), "namespace": namespace,
                     "labels": labels(name, tier), "ownerReferences": [owner_reference(owner)]},
        "spec": {"maxUnavailable": spec.tiers[tier].max_unavailable,
                 "selector": {"matchLabels": selector(name, tier)}},
    }


def drifted(desired: Any, live: Any) -> bool:
    """Whether ``live`` differs from ``desired`` in any field ``desired`` sets.

    Fields the API server adds (defaults, status, managed fields) are not drift.
    """
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return True
        return any(drifted(v, live.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(desired) != len(live):
            return True
        return any(drifted(d, x) for d, x in zip(desired, live))
    if isinstance(desired, (int, float)) and isinstance(live, str) or \
            isinstance(desired, str) and isinstance(live, (int, float)):
        return str(desired) != str(live)
    return desired != live


def drifted_beyond_scale(desired: Mapping[str, Any], live: Any, replicas: int) -> bool:
    """Whether ``live`` drifted from ``desired`` in more than a Deployment's replica count.

    ``replicas`` is the count the Deployment had before this pass: a different count in
    ``desired`` is the autoscaler's own change, not drift.
    """
    if desired["kind"] == "Deployment":
        desired = {**desired, "spec": {**desired["spec"], "replicas": replicas}}
    return drifted(desired, live)
