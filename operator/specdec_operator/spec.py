"""The ``SpeculativeDecoder`` spec as typed, defaulted, validated dataclasses.

The CRD's openAPIV3Schema (helm/specdec/crds/) validates shapes on the API server; this
module applies the same defaults in code (so the operator works without server-side
defaulting) and rejects what a schema cannot express, gathering every problem into one
``ValueError``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .policy import TIERS, TierPolicy

GROUP = "specdec.io"
VERSION = "v1alpha1"
PLURAL = "speculativedecoders"
KIND = "SpeculativeDecoder"
DEFAULT_PORTS = {"coordinator": 50051, "draft": 50052, "target": 50053}
DEFAULT_IMAGE = "ghcr.io/specdec/specdec:0.1.0"


@dataclass(frozen=True)
class GPU:
    count: int = 0                            # GPUs per replica (0 = none)
    type: str | None = None                   # value of the node label selecting the GPU model
    resource_name: str = "nvidia.com/gpu"     # extended resource requested per replica
    node_label: str = "nvidia.com/gpu.product"  # node label that carries ``type``


@dataclass(frozen=True)
class TierSpec:
    tier: str
    image: str
    device: str                               # cpu | cuda
    dtype: str | None
    port: int
    min_replicas: int
    max_replicas: int
    resources: Mapping[str, Any]              # k8s ResourceRequirements
    gpu: GPU
    node_selector: Mapping[str, str]
    tolerations: list[Any]
    affinity: Mapping[str, Any] | None
    env: list[Any]                            # extra container env entries
    max_unavailable: Any                      # PDB maxUnavailable (int or "NN%")
    autoscaling_enabled: bool
    policy: TierPolicy
    draft_tokens_per_s_per_replica: float | None = None  # draft tier capacity hint


@dataclass(frozen=True)
class DecoderSpec:
    model: str                                # target model: HF id or path
    drafter: str                              # SPECDEC_DRAFTER: ngram | none | model:NAME
    draft_length: int                         # k, for coupling the draft tier
    redis_url: str | None
    redis_secret: tuple[str, str] | None      # (secret name, key) holding the full URL
    tracing_endpoint: str | None
    image_pull_secrets: list[str]
    service_account: str | None
    tiers: dict[str, TierSpec] = field(default_factory=dict)

    @property
    def active_tiers(self) -> list[str]:
        """Tiers that run; without a drafter there is no draft tier."""
        return [t for t in TIERS if t != "draft" or self.drafter != "none"]


def _tier(name: str, raw: Mapping[str, Any], top: Mapping[str, Any], problems: list[str]) -> TierSpec:
    gpu_raw = raw.get("gpu") or {}
    gpu = GPU(count=int(gpu_raw.get("count", 0)), type=gpu_raw.get("type"),
              resource_name=gpu_raw.get("resourceName", "nvidia.com/gpu"),
              node_label=gpu_raw.get("nodeLabel", "nvidia.com/gpu.product"))
    a = raw.get("autoscaling") or {}
    tol = a.get("tolerance") or {}
    min_r = int(raw.get("minReplicas", 1))
    max_r = int(raw.get("maxReplicas", max(min_r, 1) if name == "coordinator" else 4))
    defaults = {"coordinator": dict(target_utilization=None, target_queue_depth=None,
                                    target_active_sessions=32.0)}.get(name, {})
    kw: dict[str, Any] = dict(defaults)
    for key, attr in (("targetUtilization", "target_utilization"),
                      ("targetQueueDepth", "target_queue_depth"),
                      ("targetActiveSessions", "target_active_sessions")):
        if key in a:
            kw[attr] = None if a[key] is None else float(a[key])
    try:
        policy = TierPolicy(
            min_replicas=min_r, max_replicas=max_r,
            headroom=float(a.get("headroom", 0.1)),
            tolerance_up=float(tol.get("scaleUp", 0.0)),
            tolerance_down=float(tol.get("scaleDown", 0.1)),
            scale_up_window_s=float(a.get("scaleUpStabilizationSeconds", 0)),
            scale_down_window_s=float(a.get("scaleDownStabilizationSeconds", 300)),
            max_step_up=int(a.get("maxScaleUpStep", 4)),
            max_step_down=int(a.get("maxScaleDownStep", 1)),
            scale_to_zero=bool(a.get("scaleToZero", False)),
            **kw)
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
    return TierSpec(
        tier=name,
        image=raw.get("image") or top.get("image") or DEFAULT_IMAGE,
        device=device,
        dtype=raw.get("dtype") or top.get("dtype"),
        port=int(raw.get("port", DEFAULT_PORTS[name])),
        min_replicas=min_r, max_replicas=max_r,
        resources=raw.get("resources") or {},
        gpu=gpu,
        node_selector=raw.get("nodeSelector") or {},
        tolerations=list(raw.get("tolerations") or []),
        affinity=raw.get("affinity"),
        env=list(raw.get("env") or []),
        max_unavailable=(raw.get("podDisruptionBudget") or {}).get("maxUnavailable", 1),
        autoscaling_enabled=bool(a.get("enabled", True)),
        policy=policy,
        draft_tokens_per_s_per_replica=(float(a["draftTokensPerSecondPerReplica"])
                                        if a.get("draftTokensPerSecondPerReplica") else None),
    )


def parse(spec: Mapping[str, Any]) -> DecoderSpec:
    """Defaulted, validated spec; a ``ValueError`` lists every problem at once."""
    problems: list[str] = []
    model = (spec.get("model") or {}).get("name") if isinstance(spec.get("model"), Mapping) \
        else spec.get("model")
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
    tiers = {name: _tier(name, spec.get(name) or {}, spec, problems) for name in TIERS}
    draft_length = int(spec.get("draftLength", 4))
    if not 1 <= draft_length <= 64:
        problems.append("spec.draftLength must be in [1, 64]")
    if problems:
        raise ValueError("; ".join(problems))
    return DecoderSpec(
        model=str(model), drafter=drafter, draft_length=draft_length,
        redis_url=redis.get("url"),
        redis_secret=(ref["name"], ref.get("key", "url")) if ref else None,
        tracing_endpoint=(spec.get("tracing") or {}).get("endpoint"),
        image_pull_secrets=list(spec.get("imagePullSecrets") or []),
        service_account=spec.get("serviceAccountName"),
        tiers=tiers,
    )
