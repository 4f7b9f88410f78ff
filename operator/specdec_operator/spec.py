"""The ``SpeculativeDecoder`` spec as typed, defaulted, validated dataclasses.

The CRD's openAPIV3Schema (helm/specdec/crds/) validates shapes on the API server; this
module applies the same defaults in code (so the operator works without server-side
defaulting) and rejects what a schema cannot express, gathering every problem into one
``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .policy import TIERS, TierPolicy

GROUP = "specdec.io"
VERSION = "v1alpha1"
PLURAL = "speculativedecoders"
KIND = "SpeculativeDecoder"
DEFAULT_PORTS = {"coordinator": 50051, "draft": 50052, "target": 50053}
DEFAULT_IMAGE = "ghcr.io/specdec/specdec:0.1.0"
DEFAULT_METRICS_PORT = 9464
DEFAULT_HTTP_PORT = 8000
AUTOSCALING_MODES = ("operator", "external")


@dataclass(frozen=True)
class GPU:
    count: int = 0  # GPUs per replica (0 = none)
    type: str | None = None  # value of the node label selecting the GPU model
    resource_name: str = "nvidia.com/gpu"  # extended resource requested per replica
    node_label: str = "nvidia.com/gpu.product"  # node label that carries ``type``


@dataclass(frozen=True)
class TierSpec:
    tier: str
    image: str
    device: str  # cpu | cuda
    dtype: str | None
    port: int
    min_replicas: int
    max_replicas: int
    resources: Mapping[str, Any]  # k8s ResourceRequirements
    gpu: GPU
    node_selector: Mapping[str, str]
    tolerations: list[Any]
    affinity: Mapping[str, Any] | None
    env: list[Any]  # extra container env entries
    max_unavailable: Any  # PDB maxUnavailable (int or "NN%")
    autoscaling_enabled: bool
    policy: TierPolicy
    draft_tokens_per_s_per_replica: float | None = None  # draft tier capacity hint
    autoscaling_mode: str = "operator"  # operator: it sets replicas; external: an HPA/KEDA object does
    topology_spread: list[Any] | None = None  # topologySpreadConstraints; None = spread by host and zone

    @property
    def operator_scales(self) -> bool:
        """Whether the operator owns this tier's replica count (else it leaves it alone)."""
        return self.autoscaling_mode == "operator"


@dataclass(frozen=True)
class ModelCache:
    """Where the tiers keep downloaded models: one volume shared by every replica."""

    claim_name: str | None = None  # an existing PVC (ReadWriteMany, or ReadOnlyMany pre-filled)
    size: str | None = None  # else the operator makes a PVC of this size
    storage_class: str | None = None  # of that PVC ("" = the cluster's default)
    access_mode: str = "ReadWriteMany"  # of that PVC


@dataclass(frozen=True)
class Models:
    """What the tiers load, and how it reaches them."""

    size_gb: float = 1.0  # target model on disk, GB: startup budget and cache size
    draft_size_gb: float = 1.0  # draft model on disk, GB
    token_secret: tuple[str, str] | None = None  # (secret, key) holding a hub token (HF_TOKEN)
    cache: ModelCache | None = None  # None = an emptyDir per pod, size-limited


@dataclass(frozen=True)
class SecretKey:
    """One key of one Secret (a secretKeyRef, or a file mounted from it)."""

    name: str
    key: str


@dataclass(frozen=True)
class Tls:
    """mTLS between the tiers, TLS on the public port: certificates from Secrets
    (``kubernetes.io/tls`` layout: tls.crt, tls.key, ca.crt; cert-manager writes them)."""

    coordinator_secret: str  # certificate with CN specdec-coordinator: serves clients, presented to the tiers
    tier_secret: str  # certificate naming DNS specdec-tier: the draft and target servers
    ca: SecretKey | None = None  # CA bundle in a Secret of its own; None = ca.crt of each certificate's Secret
    client_auth: bool = False  # the coordinator's public port asks clients for a certificate the CA signed


@dataclass(frozen=True)
class Security:
    """Who may call what, and the shared secrets the tiers read from Secrets."""

    tls: Tls | None = None  # None = plaintext gRPC (the tiers then ask for the internal token)
    api_keys: SecretKey | None = None  # file of SHA-256 hex digests, one a line, mounted in the coordinator
    api_key_max_calls: int = 0  # concurrent calls per API key (0 = no limit)
    internal_token: SecretKey | None = None  # SPECDEC_INTERNAL_TOKEN: what a coordinator shows a tier without TLS
    kv_secret: SecretKey | None = None  # SPECDEC_KV_SECRET: the KV chunks' MAC key (draft and target)
    redis_ca: SecretKey | None = None  # CA of a rediss:// server, mounted at REDIS_CA_FILE (SPECDEC_REDIS_CA)


@dataclass(frozen=True)
class DecoderSpec:
    model: str  # target model: HF id or path
    drafter: str  # SPECDEC_DRAFTER: ngram | none | model:NAME
    draft_length: int  # k, for coupling the draft tier
    redis_url: str | None
    redis_secret: tuple[str, str] | None  # (secret name, key) holding the full URL
    tracing_endpoint: str | None
    image_pull_secrets: list[str]
    service_account: str | None
    tiers: dict[str, TierSpec] = field(default_factory=dict)
    models: Models = field(default_factory=Models)
    metrics_port: int | None = DEFAULT_METRICS_PORT  # every tier's Prometheus port; None = off
    security: Security = field(default_factory=Security)
    http_port: int | None = None  # the coordinator's OpenAI-compatible HTTP port; None = off
    # KV chunks' own server (SPECDEC_KV_REDIS_URL, allkeys-lru); both None = they share spec.redis's
    kv_redis_url: str | None = None
    kv_redis_secret: tuple[str, str] | None = None  # (secret name, key) holding the full URL

    @property
    def active_tiers(self) -> list[str]:
        """Tiers that run; without a drafter there is no draft tier."""
        return [t for t in TIERS if t != "draft" or self.drafter != "none"]


def _tier(name: str, raw: Mapping[str, Any], top: Mapping[str, Any], problems: list[str]) -> TierSpec:
    gpu_raw = raw.get("gpu") or {}
    gpu = GPU(
        count=int(gpu_raw.get("count", 0)),
        type=gpu_raw.get("type"),
        resource_name=gpu_raw.get("resourceName", "nvidia.com/gpu"),
        node_label=gpu_raw.get("nodeLabel", "nvidia.com/gpu.product"),
    )
    a = raw.get("autoscaling") or {}
    tol = a.get("tolerance") or {}
    min_r = int(raw.get("minReplicas", 1))
    max_r = int(raw.get("maxReplicas", max(min_r, 1) if name == "coordinator" else 4))
    defaults = {"coordinator": dict(target_utilization=None, target_queue_depth=None, target_active_sessions=32.0)}.get(
        name, {}
    )
    kw: dict[str, Any] = dict(defaults)
    for key, attr in (
        ("targetUtilization", "target_utilization"),
        ("targetQueueDepth", "target_queue_depth"),
        ("targetActiveSessions", "target_active_sessions"),
    ):
        if key in a:
            kw[attr] = None if a[key] is None else float(a[key])
    try:
        policy = TierPolicy(
            min_replicas=min_r,
            max_replicas=max_r,
            headroom=float(a.get("headroom", 0.1)),
            tolerance_up=float(tol.get("scaleUp", 0.0)),
            tolerance_down=float(tol.get("scaleDown", 0.1)),
            scale_up_window_s=float(a.get("scaleUpStabilizationSeconds", 0)),
            scale_down_window_s=float(a.get("scaleDownStabilizationSeconds", 300)),
            max_step_up=int(a.get("maxScaleUpStep", 4)),
            max_step_down=int(a.get("maxScaleDownStep", 1)),
            scale_to_zero=bool(a.get("scaleToZero", False)),
            **kw,
        )
    except ValueError as exc:
        problems.append(f"{name}: {exc}")
        policy = TierPolicy(min_replicas=0, max_replicas=1)
    if policy.scale_to_zero and name != "draft":
        problems.append(f"{name}: scaleToZero is only allowed for the draft tier")
    device = raw.get("device") or ("cuda" if gpu.count else "cpu")
    if device not in ("cpu", "cuda"):
        problems.append(f"{name}: device must be cpu or cuda, not {device!r}")
    if device == "cuda" and gpu.count == 0:
        problems.append(f"{name}: device cuda needs gpu.count >= 1")
    if gpu.count > 1:
        problems.append(
            f"{name}: gpu.count {gpu.count} is refused: a replica loads its model on one "
            "device (no sharding across a pod's GPUs yet); use gpu.count 1 and more replicas"
        )
    mode = a.get("mode", "operator")
    if mode not in AUTOSCALING_MODES:
        problems.append(f"{name}: autoscaling.mode must be operator or external, not {mode!r}")
    return TierSpec(
        tier=name,
        image=raw.get("image") or top.get("image") or DEFAULT_IMAGE,
        device=device,
        dtype=raw.get("dtype") or top.get("dtype"),
        port=int(raw.get("port", DEFAULT_PORTS[name])),
        min_replicas=min_r,
        max_replicas=max_r,
        resources=raw.get("resources") or {},
        gpu=gpu,
        node_selector=raw.get("nodeSelector") or {},
        tolerations=list(raw.get("tolerations") or []),
        affinity=raw.get("affinity"),
        env=list(raw.get("env") or []),
        max_unavailable=(raw.get("podDisruptionBudget") or {}).get("maxUnavailable", 1),
        autoscaling_enabled=bool(a.get("enabled", True)),
        policy=policy,
        draft_tokens_per_s_per_replica=(
            float(a["draftTokensPerSecondPerReplica"]) if a.get("draftTokensPerSecondPerReplica") else None
        ),
        autoscaling_mode=mode,
        topology_spread=(
            list(raw["topologySpreadConstraints"]) if raw.get("topologySpreadConstraints") is not None else None
        ),
    )


def _models(spec: Mapping[str, Any], problems: list[str]) -> Models:
    raw_model = spec.get("model")
    m: Mapping[str, Any] = raw_model if isinstance(raw_model, Mapping) else {}
    ref = m.get("tokenSecretRef")
    c = m.get("cache") or {}
    cache = None
    if c:
        if bool(c.get("claimName")) == bool(c.get("size")):
            problems.append("spec.model.cache: set claimName (an existing PVC) or size (a new one), one of them")
        cache = ModelCache(
            claim_name=c.get("claimName") or None,
            size=c.get("size") or None,
            storage_class=c.get("storageClassName"),
            access_mode=c.get("accessMode", "ReadWriteMany"),
        )
    size = float(m.get("sizeGB", 1.0))
    draft_size = float((spec.get("drafter") or {}).get("sizeGB", 1.0))
    if size <= 0 or draft_size <= 0:
        problems.append("spec.model.sizeGB and spec.drafter.sizeGB must be > 0")
    return Models(
        size_gb=size,
        draft_size_gb=draft_size,
        token_secret=(ref["name"], ref.get("key", "token")) if ref else None,
        cache=cache,
    )


def _secret_key(raw: Any, default_key: str, where: str, problems: list[str]) -> SecretKey | None:
    """A ``{name, key}`` reference (key defaulted), None when absent."""
    if not raw:
        return None
    if not isinstance(raw, Mapping) or not raw.get("name"):
        problems.append(f"{where}.name is required")
        return None
    return SecretKey(str(raw["name"]), str(raw.get("key") or default_key))


def _tls(raw: Any, problems: list[str]) -> Tls | None:
    if not raw:
        return None
    coordinator, tier = raw.get("coordinatorSecretName"), raw.get("tierSecretName")
    if not coordinator or not tier:
        problems.append("spec.tls: coordinatorSecretName and tierSecretName are both required")
    return Tls(
        coordinator_secret=str(coordinator or ""),
        tier_secret=str(tier or ""),
        ca=_secret_key(raw.get("caSecretRef"), "ca.crt", "spec.tls.caSecretRef", problems),
        client_auth=bool(raw.get("clientAuth", False)),
    )


def _security(spec: Mapping[str, Any], problems: list[str]) -> Security:
    keys = spec.get("apiKeys") or {}
    max_calls = int(keys.get("maxCallsPerKey", 0))
    if max_calls < 0:
        problems.append("spec.apiKeys.maxCallsPerKey must be >= 0")
    if keys and not keys.get("secretRef"):
        problems.append("spec.apiKeys.secretRef is required")
    redis_tls = (spec.get("redis") or {}).get("tls") or {}
    return Security(
        tls=_tls(spec.get("tls"), problems),
        api_keys=_secret_key(keys.get("secretRef"), "api-keys", "spec.apiKeys.secretRef", problems),
        api_key_max_calls=max_calls,
        internal_token=_secret_key(
            spec.get("internalTokenSecretRef"), "internal-token", "spec.internalTokenSecretRef", problems
        ),
        kv_secret=_secret_key(spec.get("kvSecretRef"), "kv-secret", "spec.kvSecretRef", problems),
        redis_ca=_secret_key(redis_tls.get("caSecretRef"), "ca.crt", "spec.redis.tls.caSecretRef", problems),
    )


def parse(spec: Mapping[str, Any]) -> DecoderSpec:
    """Defaulted, validated spec; a ``ValueError`` lists every problem at once."""
    problems: list[str] = []
    model = (spec.get("model") or {}).get("name") if isinstance(spec.get("model"), Mapping) else spec.get("model")
    if not model:
        problems.append("spec.model.name is required")
    d = spec.get("drafter") or {}
    dtype_ = d.get("type", "ngram")
    if dtype_ == "model":
        if not d.get("model"):
            problems.append("spec.drafter.model is required when spec.drafter.type is model")
        drafter = f"model:{d.get('model')}"
    elif dtype_ in ("ngram", "none"):
        drafter = dtype_
    else:
        problems.append(f"spec.drafter.type must be model, ngram or none, not {dtype_!r}")
        drafter = "none"
    redis = spec.get("redis") or {}
    ref = redis.get("urlSecretRef")
    if redis.get("url") and ref:
        problems.append("spec.redis: set url or urlSecretRef, not both")
    kv_redis = spec.get("kvRedis") or {}
    kv_ref = _secret_key(kv_redis.get("urlSecretRef"), "url", "spec.kvRedis.urlSecretRef", problems)
    if kv_redis.get("url") and kv_ref:
        problems.append("spec.kvRedis: set url or urlSecretRef, not both")
    tiers = {name: _tier(name, spec.get(name) or {}, spec, problems) for name in TIERS}
    draft_length = int(spec.get("draftLength", 4))
    if not 1 <= draft_length <= 64:
        problems.append("spec.draftLength must be in [1, 64]")
    models = _models(spec, problems)
    metrics = spec.get("metrics") or {}
    metrics_port = int(metrics.get("port", DEFAULT_METRICS_PORT)) if metrics.get("enabled", True) else None
    ports = [t.port for t in tiers.values()]
    if metrics_port is not None and metrics_port in ports:
        problems.append(f"spec.metrics.port {metrics_port} is also a tier's gRPC port")
    http = spec.get("http") or {}
    http_port = int(http.get("port", DEFAULT_HTTP_PORT)) if http.get("enabled", False) else None
    if http_port is not None and http_port in [*ports, metrics_port]:
        problems.append(f"spec.http.port {http_port} is also a tier's gRPC or the metrics port")
    security = _security(spec, problems)
    if problems:
        raise ValueError("; ".join(problems))
    return DecoderSpec(
        model=str(model),
        drafter=drafter,
        draft_length=draft_length,
        redis_url=redis.get("url"),
        redis_secret=(ref["name"], ref.get("key", "url")) if ref else None,
        tracing_endpoint=(spec.get("tracing") or {}).get("endpoint"),
        image_pull_secrets=list(spec.get("imagePullSecrets") or []),
        service_account=spec.get("serviceAccountName"),
        tiers=tiers,
        models=models,
        metrics_port=metrics_port,
        security=security,
        http_port=http_port,
        kv_redis_url=kv_redis.get("url") or None,
        kv_redis_secret=(kv_ref.name, kv_ref.key) if kv_ref else None,
    )
