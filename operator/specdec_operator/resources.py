"""Desired Deployments, Services, PodDisruptionBudgets and the model-cache PVC of one
``SpeculativeDecoder``.

Pure functions from the parsed spec to manifests; the handlers apply them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .spec import GROUP, KIND, VERSION, DecoderSpec, SecretKey, TierSpec

MANAGED_BY = "specdec-operator"
HOME = "/home/specdec"
TIER_SERVER_NAME = "specdec-tier"  # a DNS name of every tier certificate (specdec.rpc.tls; no services import here)
HF_HOME = f"{HOME}/.cache/huggingface"
STARTUP_BASE_S = 120  # startup probe budget of a tier: imports, tokenizer, warm-up ...
STARTUP_S_PER_GB = 20  # ... plus reading its model from the cache volume (~50 MB/s)
PROBE_PERIOD_S = 5
TMP_SIZE_LIMIT = "1Gi"
# Secrets are mounted as whole volumes, never by subPath: the kubelet swaps a mounted
# Secret's files in place when it changes, and the services re-read them (certificate
# rotation without a restart); a subPath mount would keep the old file for good.
TLS_DIR = "/etc/specdec/tls"  # tls.crt, tls.key (and ca.crt) of this tier's certificate
TLS_CA_FILE = "/etc/specdec/tls-ca/ca.crt"  # the CA, when it has a Secret of its own
API_KEYS_FILE = "/etc/specdec/api-keys/api-keys"  # the coordinator's hashed API keys
REDIS_CA_FILE = "/etc/specdec/redis-ca/ca.crt"  # a rediss:// server's CA (SPECDEC_REDIS_CA, read by specdec_records)
SECRET_MODE = 0o440  # owner and group (fsGroup) read; nobody else
TLS_PROBE_PERIOD_S = 10  # exec probes start a Python process: half as often as the gRPC ones
TLS_PROBE_TIMEOUT_S = 5
# Downloads every hub model a tier loads into the cache volume before the tier starts
# (huggingface_hub locks the cache, so replicas that share it download each file once);
# "tokenizer" entries fetch only configs and tokenizer files (what a coordinator loads).
FETCH_MODELS = """\
import os, sys
from huggingface_hub import snapshot_download
for entry in sys.argv[1:]:
    name, _, what = entry.partition("=")
    if "/" not in name or name.startswith(("/", ".")) or os.path.exists(name):
        print(f"{name}: not a hub id, nothing to fetch", flush=True)
        continue
    files = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"] if what == "tokenizer" else None
    print(f"{name}: fetching {'tokenizer and config' if files else 'everything'}", flush=True)
    print(f"{name}: in {snapshot_download(name, allow_patterns=files)}", flush=True)
"""


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
    return {"app.kubernetes.io/instance": name, "app.kubernetes.io/component": tier, f"{GROUP}/decoder": name}


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    meta = owner["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def tier_models(spec: DecoderSpec, tier: str) -> list[str]:
    """What the tier's init step fetches: ``NAME`` (everything) or ``NAME=tokenizer``."""
    target = spec.model.partition("@")[0]
    if tier == "coordinator":
        return [f"{target}=tokenizer"]
    if tier == "draft":
        return [spec.drafter.removeprefix("model:").partition("@")[0]] if spec.drafter.startswith("model:") else []
    return [target]


def fetches(spec: DecoderSpec, tier: str) -> bool:
    """Whether the tier has any hub model to fetch before it starts."""
    return any("/" in m and not m.startswith(("/", ".")) for m in tier_models(spec, tier))


def model_gb(spec: DecoderSpec, tier: str) -> float:
    """GB of model weights the tier loads (the coordinator only a tokenizer)."""
    return {
        "coordinator": 0.0,
        "draft": spec.models.draft_size_gb if spec.drafter.startswith("model:") else 0.0,
        "target": spec.models.size_gb,
    }[tier]


def startup_failure_threshold(spec: DecoderSpec, tier: str) -> int:
    """Startup probe failures allowed: a base budget plus the time to read the model."""
    budget = STARTUP_BASE_S + STARTUP_S_PER_GB * model_gb(spec, tier)
    return max(12, math.ceil(budget / PROBE_PERIOD_S))


def model_cache_claim(spec: DecoderSpec, name: str) -> str | None:
    """The PVC every replica mounts as its model cache, if any."""
    cache = spec.models.cache
    if cache is None:
        return None
    return cache.claim_name or f"{name}-model-cache"


def _hub_env(spec: DecoderSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "HOME", "value": HOME}, {"name": "HF_HOME", "value": HF_HOME}]
    if spec.models.token_secret is not None:
        secret, key = spec.models.token_secret
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return env


@dataclass(frozen=True)
class DefaultRedis:
    """What a resource naming no Redis gets: the operator's default server, its URL (with the
    password) read by the tiers from a Secret; without one, the bare URL minus its password."""

    url: str | None = None  # SPECDEC_OPERATOR_REDIS_URL
    url_secret: tuple[str, str] | None = None  # (name, key) in the resource's namespace; wins over url
    kv_url_secret: tuple[str, str] | None = None  # the default KV chunks' server, likewise


def _redis_env(spec: DecoderSpec, default: DefaultRedis) -> list[dict[str, Any]]:
    """SPECDEC_REDIS_URL and SPECDEC_KV_REDIS_URL: a password only ever by secretKeyRef (or in a
    URL the resource's owner wrote into it themselves)."""
    env: list[dict[str, Any]] = []
    names_redis = spec.redis_secret is not None or bool(spec.redis_url)
    if spec.redis_secret is not None:
        env.append(_secret_env("SPECDEC_REDIS_URL", SecretKey(*spec.redis_secret)))
    elif spec.redis_url:
        env.append({"name": "SPECDEC_REDIS_URL", "value": spec.redis_url})
    elif default.url_secret is not None:
        env.append(_secret_env("SPECDEC_REDIS_URL", SecretKey(*default.url_secret)))
    elif default.url:
        env.append({"name": "SPECDEC_REDIS_URL", "value": without_password(default.url)})
    if spec.kv_redis_secret is not None:
        env.append(_secret_env("SPECDEC_KV_REDIS_URL", SecretKey(*spec.kv_redis_secret)))
    elif spec.kv_redis_url:
        env.append({"name": "SPECDEC_KV_REDIS_URL", "value": spec.kv_redis_url})
    elif not names_redis and default.kv_url_secret is not None:
        # The default KV server goes with the default state server only: a resource that named
        # its own Redis keeps its chunks there unless it names a KV server too.
        env.append(_secret_env("SPECDEC_KV_REDIS_URL", SecretKey(*default.kv_url_secret)))
    return env


def _env(spec: DecoderSpec, t: TierSpec, namespace: str, name: str, default: DefaultRedis) -> list[dict[str, Any]]:
    env = _redis_env(spec, default)
    env += [
        {"name": "SPECDEC_REDIS_PREFIX", "value": redis_prefix(namespace, name)},
        {"name": "SPECDEC_MODEL", "value": spec.model},
        {"name": "SPECDEC_DRAFTER", "value": spec.drafter},
        {"name": "SPECDEC_PORT", "value": str(t.port)},
        {"name": "SPECDEC_DEVICE", "value": t.device},
        {"name": "SPECDEC_METRICS_PORT", "value": str(spec.metrics_port or 0)},
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
        *_hub_env(spec),
    ]
    if fetches(spec, t.tier):  # the init step fetched every model: no hub calls at start
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    return env + _security_env(spec, t.tier) + copy.deepcopy(t.env)


def without_password(url: str) -> str:
    """``url`` without its password. The operator's default Redis URL (for resources naming none)
    may carry the bundled Valkey's password, read from a Secret the resource's owner may not
    read: copied into their Deployment it would hand whoever can create a SpeculativeDecoder the
    keys to the registry. Their tiers get the URL without it (AUTH fails, visibly) until the
    resource names a Secret of its own (spec.redis.urlSecretRef)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rsplit("@", 1)[1]))


def _secret_env(name: str, ref: SecretKey) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _security_env(spec: DecoderSpec, tier: str) -> list[dict[str, Any]]:
    """TLS files, API keys, the internal token and the KV MAC key: paths and secretKeyRefs,
    never a secret's value (the Deployment is readable by more people than its Secrets)."""
    sec, env = spec.security, []
    if sec.tls is not None:
        ca = TLS_CA_FILE if sec.tls.ca is not None else f"{TLS_DIR}/ca.crt"
        env += [
            {"name": "SPECDEC_TLS_CERT_FILE", "value": f"{TLS_DIR}/tls.crt"},
            {"name": "SPECDEC_TLS_KEY_FILE", "value": f"{TLS_DIR}/tls.key"},
            {"name": "SPECDEC_TLS_CA_FILE", "value": ca},
            # The tiers check the caller's certificate names the coordinator: they always ask for one.
            {"name": "SPECDEC_TLS_CLIENT_AUTH", "value": str(sec.tls.client_auth or tier != "coordinator").lower()},
        ]
    if sec.redis_ca is not None:
        env.append({"name": "SPECDEC_REDIS_CA", "value": REDIS_CA_FILE})
    if sec.internal_token is not None:
        env.append(_secret_env("SPECDEC_INTERNAL_TOKEN", sec.internal_token))
    if tier == "coordinator":
        if sec.api_keys is not None:
            env.append({"name": "SPECDEC_API_KEYS_FILE", "value": API_KEYS_FILE})
            env.append({"name": "SPECDEC_API_KEY_MAX_CALLS", "value": str(sec.api_key_max_calls)})
        if spec.http_port:
            env.append({"name": "SPECDEC_HTTP_PORT", "value": str(spec.http_port)})
    elif sec.kv_secret is not None:
        env.append(_secret_env("SPECDEC_KV_SECRET", sec.kv_secret))
    return env


def _secret_volume(volume: str, secret: str, items: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """A Secret as a volume of owner/group-readable files; ``items`` maps keys to file names."""
    source: dict[str, Any] = {"secretName": secret, "defaultMode": SECRET_MODE}
    if items:
        source["items"] = [{"key": key, "path": path} for key, path in items]
    return {"name": volume, "secret": source}


def _security_volumes(spec: DecoderSpec, tier: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, their mounts) of the tier's certificates, API keys and Redis CA."""
    sec = spec.security
    found: list[tuple[dict[str, Any], str]] = []  # (volume, the folder it is mounted at)
    if sec.tls is not None:
        secret = sec.tls.coordinator_secret if tier == "coordinator" else sec.tls.tier_secret
        found.append((_secret_volume("tls", secret), TLS_DIR))
        if sec.tls.ca is not None:
            found.append((_secret_volume("tls-ca", sec.tls.ca.name, [(sec.tls.ca.key, "ca.crt")]), _dir(TLS_CA_FILE)))
    if tier == "coordinator" and sec.api_keys is not None:
        keys = _secret_volume("api-keys", sec.api_keys.name, [(sec.api_keys.key, "api-keys")])
        found.append((keys, _dir(API_KEYS_FILE)))
    if sec.redis_ca is not None:
        redis_ca = _secret_volume("redis-ca", sec.redis_ca.name, [(sec.redis_ca.key, "ca.crt")])
        found.append((redis_ca, _dir(REDIS_CA_FILE)))
    mounts = [{"name": v["name"], "mountPath": folder, "readOnly": True} for v, folder in found]
    return [v for v, _ in found], mounts


def _dir(path: str) -> str:
    return path.rsplit("/", 1)[0]


def probes(spec: DecoderSpec, name: str, tier: str) -> dict[str, dict[str, Any]]:
    """Startup, readiness and liveness probes: the gRPC health service.

    The kubelet's own gRPC probe speaks plaintext only; under TLS the image's
    ``specdec-health`` checks the same service over mTLS with the pod's certificate,
    verifying the server's name (tiers: specdec-tier; the coordinator: its Service's).
    """
    t = spec.tiers[tier]
    startup = {"periodSeconds": PROBE_PERIOD_S, "failureThreshold": startup_failure_threshold(spec, tier)}
    if spec.security.tls is None:
        check: dict[str, Any] = {"grpc": {"port": t.port}}
        ready, live = {"periodSeconds": 5, "failureThreshold": 3}, {"periodSeconds": 10, "failureThreshold": 6}
    else:
        server_name = child_name(name, tier) if tier == "coordinator" else TIER_SERVER_NAME
        command = ["specdec-health", f"127.0.0.1:{t.port}", "", server_name]
        check = {"exec": {"command": command}, "timeoutSeconds": TLS_PROBE_TIMEOUT_S}
        ready = {"periodSeconds": TLS_PROBE_PERIOD_S, "failureThreshold": 2}
        live = {"periodSeconds": TLS_PROBE_PERIOD_S, "failureThreshold": 6}
    return {
        "startupProbe": {**copy.deepcopy(check), **startup},
        "readinessProbe": {**copy.deepcopy(check), **ready},
        "livenessProbe": {**copy.deepcopy(check), **live},
    }


def security_context(run_as_user: int | None) -> dict[str, Any]:
    """Container security context; ``run_as_user`` None leaves UIDs to the platform (OpenShift)."""
    ctx: dict[str, Any] = {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    if run_as_user is not None:
        ctx.update(runAsUser=run_as_user, runAsGroup=run_as_user)
    return ctx


def topology_spread(name: str, t: TierSpec) -> list[Any]:
    """The tier's spread: as the spec says, else by host and by zone, best effort."""
    if t.topology_spread is not None:
        return copy.deepcopy(t.topology_spread)
    return [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector(name, t.tier)},
        }
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
    ]


def _volumes(spec: DecoderSpec, name: str, tier: str) -> list[dict[str, Any]]:
    claim = model_cache_claim(spec, name)
    if claim is not None:
        cache: dict[str, Any] = {"name": "cache", "persistentVolumeClaim": {"claimName": claim}}
    else:  # one download per pod: room for the tier's model, its copy while converting, and slack
        limit = max(2, math.ceil(2 * model_gb(spec, tier) + 1))
        cache = {"name": "cache", "emptyDir": {"sizeLimit": f"{limit}Gi"}}
    return [{"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}}, cache]


def deployment(
    owner: Mapping[str, Any],
    spec: DecoderSpec,
    tier: str,
    replicas: int | None,
    default_redis_url: str | None = None,
    run_as_user: int | None = 10001,
    default_redis: DefaultRedis | None = None,
) -> dict[str, Any]:
    """The tier's Deployment with ``replicas`` replicas (None: leave the count to an HPA/KEDA).
    A resource naming no Redis gets ``default_redis`` (else the bare ``default_redis_url``)."""
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
    ports = [{"name": "grpc", "containerPort": t.port, "protocol": "TCP"}]
    if spec.metrics_port:
        ports.append({"name": "metrics", "containerPort": spec.metrics_port, "protocol": "TCP"})
    if tier == "coordinator" and spec.http_port:
        ports.append({"name": "http", "containerPort": spec.http_port, "protocol": "TCP"})
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": f"{HOME}/.cache"}]
    secret_volumes, secret_mounts = _security_volumes(spec, tier)
    container: dict[str, Any] = {
        "name": tier,
        "image": t.image,
        "command": ["specdec", "serve", tier],
        "ports": ports,
        "env": _env(spec, t, namespace, name, default_redis or DefaultRedis(default_redis_url)),
        "resources": resources,
        # Reading the model from the cache volume: a startup budget that grows with its size.
        **probes(spec, name, tier),
        "securityContext": security_context(run_as_user),
        "volumeMounts": mounts + secret_mounts,
    }
    pod_security: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if run_as_user is not None:
        pod_security["fsGroup"] = run_as_user
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "securityContext": pod_security,
        "automountServiceAccountToken": False,
        "volumes": _volumes(spec, name, tier) + secret_volumes,
        "topologySpreadConstraints": topology_spread(name, t),
        "terminationGracePeriodSeconds": 30,
    }
    if fetches(spec, tier):
        pod_spec["initContainers"] = [
            {
                "name": "fetch-model",
                "image": t.image,
                "command": ["python3", "-c", FETCH_MODELS, *tier_models(spec, tier)],
                "env": _hub_env(spec),
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                "securityContext": security_context(run_as_user),
                "volumeMounts": copy.deepcopy(mounts),
            }
        ]
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
        "metadata": {
            "name": child_name(name, tier),
            "namespace": namespace,
            "labels": labels(name, tier),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            **({"replicas": replicas} if replicas is not None else {}),
            "selector": {"matchLabels": selector(name, tier)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels(name, tier)}, "spec": pod_spec},
        },
    }


def model_cache_pvc(owner: Mapping[str, Any], spec: DecoderSpec) -> dict[str, Any] | None:
    """The model-cache PVC the operator makes (``spec.model.cache.size``); None otherwise."""
    cache = spec.models.cache
    if cache is None or cache.claim_name or not cache.size:
        return None
    meta = owner["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    pvc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": f"{name}-model-cache",
            "namespace": namespace,
            "labels": labels(name, "model-cache"),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {"accessModes": [cache.access_mode], "resources": {"requests": {"storage": cache.size}}},
    }
    if cache.storage_class is not None:
        pvc["spec"]["storageClassName"] = cache.storage_class
    return pvc


def service(owner: Mapping[str, Any], spec: DecoderSpec, tier: str) -> dict[str, Any]:
    """ClusterIP for the coordinator (the public API); headless for the inner tiers."""
    meta = owner["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    t = spec.tiers[tier]
    svc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": child_name(name, tier),
            "namespace": namespace,
            "labels": labels(name, tier),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "selector": selector(name, tier),
            "ports": [{"name": "grpc", "port": t.port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}],
        },
    }
    if spec.metrics_port:  # what a ServiceMonitor selects
        svc["spec"]["ports"].append(
            {
                "name": "metrics",
                "port": spec.metrics_port,
                "targetPort": "metrics",
                "protocol": "TCP",
                "appProtocol": "http",
            }
        )
    if tier == "coordinator" and spec.http_port:  # the OpenAI-compatible API (HTTPS under TLS)
        scheme = "https" if spec.security.tls is not None else "http"
        svc["spec"]["ports"].append(
            {"name": "http", "port": spec.http_port, "targetPort": "http", "protocol": "TCP", "appProtocol": scheme}
        )
    if tier != "coordinator":
        svc["spec"]["clusterIP"] = "None"
    return svc


def pdb(owner: Mapping[str, Any], spec: DecoderSpec, tier: str) -> dict[str, Any]:
    meta = owner["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": child_name(name, tier),
            "namespace": namespace,
            "labels": labels(name, tier),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {"maxUnavailable": spec.tiers[tier].max_unavailable, "selector": {"matchLabels": selector(name, tier)}},
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
    if (isinstance(desired, (int, float)) and isinstance(live, str)) or (
        isinstance(desired, str) and isinstance(live, (int, float))
    ):
        return str(desired) != str(live)
    return bool(desired != live)


def drifted_beyond_scale(desired: Mapping[str, Any], live: Any, replicas: int) -> bool:
    """Whether ``live`` drifted from ``desired`` in more than a Deployment's replica count.

    ``replicas`` is the count the Deployment had before this pass: a different count in
    ``desired`` is the autoscaler's own change, not drift.
    """
    if desired["kind"] == "Deployment" and "replicas" in desired["spec"]:
        desired = {**desired, "spec": {**desired["spec"], "replicas": replicas}}
    return drifted(desired, live)
