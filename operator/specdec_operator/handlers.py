"""kopf handlers: thin wrappers around :func:`reconcile`.

* create / update / resume: apply the tiers' Deployments, Services and PDBs now;
* a timer (``SPECDEC_OPERATOR_INTERVAL_S``): re-apply drift and autoscale each tier from
  the load its replicas publish in Redis, with an Event for every scaling decision;
* delete: remove the owned objects (owner references make the cluster's garbage
  collector do the same; deleting explicitly also covers clusters where it lags).
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Any, Mapping

import kopf
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import resources
from .config import OperatorConfig
from .kube import ApiError, Kube
from .load import read_loads
from .policy import TIERS, Coupling, Decision, History, ReplicaLoad, decide
from .spec import GROUP, PLURAL, VERSION, DecoderSpec, parse

CONFIG = OperatorConfig.from_env()
KUBE = Kube()
KINDS = ("Deployment", "Service", "PodDisruptionBudget")


class State:
    """Per-object, in-memory: the stabilization histories and the Redis client."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.histories: dict[str, History] = {}
        self.redis: aioredis.Redis | None = None
        self.redis_url: str | None = None

    def history(self, tier: str) -> History:
        return self.histories.setdefault(tier, History(started_at=time.monotonic()))

    async def client(self, url: str) -> aioredis.Redis:
        if self.redis is None or url != self.redis_url:
            await self.close()
            self.redis = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            self.redis_url = url
        return self.redis

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None


def _state(memo: kopf.Memo) -> State:
    if "specdec" not in memo:
        memo["specdec"] = State()
    return memo["specdec"]


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "specdec-operator"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Plain URL (dev, tests), else the pod's service account, else kubeconfig."""
    if CONFIG.api_url:
        info: kopf.ConnectionInfo | None = kopf.ConnectionInfo(server=CONFIG.api_url, insecure=True)
    else:
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        KUBE.configure(info)
    return info


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    await KUBE.close()


@kopf.on.probe(id="tiers_managed")
def probe(**_: Any) -> bool:
    return True


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
async def apply_handler(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch,
                        logger: logging.Logger, **_: Any) -> None:
    await reconcile(body, memo, patch, logger, autoscale=False)


@kopf.timer(GROUP, VERSION, PLURAL, interval=CONFIG.interval_s, initial_delay=CONFIG.interval_s)
async def autoscale_timer(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch,
                          logger: logging.Logger, **_: Any) -> None:
    await reconcile(body, memo, patch, logger, autoscale=True)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete_handler(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                         **_: Any) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    for tier in TIERS:
        for kind in KINDS:
            if await KUBE.delete(kind, ns, resources.child_name(name, tier)):
                logger.info("deleted %s %s", kind, resources.child_name(name, tier))
    await _state(memo).close()


async def redis_url(spec: DecoderSpec, namespace: str) -> str | None:
    if spec.redis_url:
        return spec.redis_url
    if spec.redis_secret:
        secret, key = spec.redis_secret
        return await KUBE.secret_value(namespace, secret, key)
    return CONFIG.default_redis_url


def coupling(spec: DecoderSpec, target: list[ReplicaLoad]) -> Coupling:
    rated = [(x.acceptance_rate, max(x.tokens_per_s, 1e-9)) for x in target
             if x.acceptance_rate is not None]
    acc = sum(a * w for a, w in rated) / sum(w for _, w in rated) if rated else None
    return Coupling(
        target_tokens_per_s=sum(x.tokens_per_s for x in target),
        target_active_sessions=sum(x.active_sessions for x in target),
        target_queue_depth=sum(x.queue_depth for x in target),
        draft_length=spec.draft_length, acceptance_rate=acc,
        draft_tokens_per_s_per_replica=spec.tiers["draft"].draft_tokens_per_s_per_replica)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions(old: list[Mapping[str, Any]], new: dict[str, tuple[bool, str, str]]
                ) -> list[dict[str, Any]]:
    """Conditions with lastTransitionTime kept while the status does not change."""
    before = {c.get("type"): c for c in old or []}
    out = []
    for kind, (ok, reason, message) in new.items():
        status = "True" if ok else "False"
        prev = before.get(kind) or {}
        since = prev.get("lastTransitionTime") if prev.get("status") == status else None
        out.append({"type": kind, "status": status, "reason": reason, "message": message[:1000],
                    "lastTransitionTime": since or _now()})
    return out


async def reconcile(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch,
                    logger: logging.Logger, *, autoscale: bool) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    old_status = dict(body.get("status") or {})
    try:
        spec = parse(body.get("spec") or {})
    except ValueError as exc:
        patch.status["conditions"] = _conditions(old_status.get("conditions") or [], {
            "Ready": (False, "InvalidSpec", str(exc)),
            "Scaling": (False, "InvalidSpec", str(exc)),
            "Degraded": (True, "InvalidSpec", str(exc))})
        if autoscale:
            return
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        raise kopf.PermanentError(str(exc)) from exc
    state = _state(memo)
    owner = {"metadata": {"name": name, "namespace": ns, "uid": meta["uid"]}}
    async with state.lock:
        url = await redis_url(spec, ns)
        loads: dict[str, list[ReplicaLoad]] = {t: [] for t in TIERS}
        problems: list[str] = []
        if autoscale:
            if url is None:
                problems.append("no Redis URL: autoscaling paused")
            else:
                try:
                    client = await state.client(url)
                    loads = await read_loads(client, resources.redis_prefix(ns, name),
                                             CONFIG.heartbeat_max_age_s)
                except (RedisError, OSError) as exc:
                    problems.append(f"Redis unreachable, autoscaling paused: {exc}")
        tiers_status: dict[str, Any] = {}
        decisions: list[Decision] = []
        for tier in TIERS:
            dep_name = resources.child_name(name, tier)
            if tier not in spec.active_tiers:
                for kind in KINDS:
                    await KUBE.delete(kind, ns, dep_name)
                continue
            t = spec.tiers[tier]
            live = await KUBE.get("Deployment", ns, dep_name)
            current = int(((live or {}).get("spec") or {}).get("replicas", t.min_replicas))
            replicas = min(max(current, t.min_replicas), t.max_replicas)
            if not t.autoscaling_enabled:
                replicas = t.min_replicas
            tstatus = dict((old_status.get("tiers") or {}).get(tier) or {})
            if autoscale and t.autoscaling_enabled and not problems:
                d = decide(tier, t.policy, loads[tier], current, state.history(tier),
                           time.monotonic(), coupling(spec, loads["target"]) if tier == "draft" else None)
                replicas = d.desired
                decisions.append(d)
                if d.observed.missing and current:
                    problems.append(f"{tier}: {d.observed.missing} of {current} replicas not reporting")
                if d.desired != d.current:
                    reason = "ScaledUp" if d.desired > d.current else "ScaledDown"
                    message = f"{tier}: {d.current} -> {d.desired} replicas: {d.reason}"
                    kopf.event(body, type="Normal", reason=reason, message=message)
                    logger.info(message)
                    tstatus.update(lastScaleTime=_now(), lastScaleReason=message[:300])
                o = d.observed
                tstatus.update(recommendedReplicas=d.recommended, reportingReplicas=o.reporting,
                               activeSessions=o.active_sessions,
                               tokensPerSecond=round(o.tokens_per_s, 2),
                               utilization=None if o.utilization is None else round(o.utilization, 3),
                               queueDepth=None if o.queue_depth is None else round(o.queue_depth, 2))
            wanted = [resources.deployment(owner, spec, tier, replicas, CONFIG.default_redis_url),
                      resources.service(owner, spec, tier), resources.pdb(owner, spec, tier)]
            for obj in wanted:
                have = live if obj["kind"] == "Deployment" else \
                    await KUBE.get(obj["kind"], ns, obj["metadata"]["name"])
                if have is not None and not resources.drifted(obj, have):
                    continue
                try:
                    await KUBE.apply(obj)
                except ApiError as exc:
                    raise kopf.TemporaryError(f"applying {obj['kind']} {dep_name}: {exc}", delay=5)
                if have is None:
                    logger.info("created %s %s", obj["kind"], dep_name)
                elif autoscale and not (obj["kind"] == "Deployment" and
                                        not resources.drifted({**obj, "spec": {**obj["spec"],
                                                              "replicas": current}}, have)):
                    kopf.event(body, type="Normal", reason="DriftCorrected",
                               message=f"re-applied {obj['kind']} {dep_name}")
            ready = int(((live or {}).get("status") or {}).get("readyReplicas") or 0)
            tstatus.update(desiredReplicas=replicas, readyReplicas=ready)
            tiers_status[tier] = tstatus
        acc = [d.observed.acceptance_rate for d in decisions
               if d.tier == "target" and d.observed.acceptance_rate is not None]
        scaling = [f"{d.tier} {d.current}->{d.desired}" for d in decisions if d.desired != d.current]
        not_ready = [t for t, s in tiers_status.items()
                     if s["desiredReplicas"] > 0 and s["readyReplicas"] < 1]
        patch.status["observedGeneration"] = meta.get("generation")
        patch.status["tiers"] = tiers_status
        if acc:
            patch.status["acceptanceRate"] = round(acc[0], 3)
        patch.status["conditions"] = _conditions(old_status.get("conditions") or [], {
            "Ready": (not not_ready, "TiersReady" if not not_ready else "TiersNotReady",
                      "every tier has a ready replica" if not not_ready
                      else "no ready replica in: " + ", ".join(not_ready)),
            "Scaling": (bool(scaling), "Scaling" if scaling else "Stable",
                        "; ".join(scaling) or "replica counts match the load"),
            "Degraded": (bool(problems), "Degraded" if problems else "Healthy",
                         "; ".join(problems) or "all replicas report load"),
        })
        if problems and autoscale:
            logger.warning("; ".join(problems))
