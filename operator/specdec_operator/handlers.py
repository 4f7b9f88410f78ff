"""kopf handlers: thin wrappers around :func:`reconcile`, which does the I/O of one pass
(Redis, the Kubernetes API, Events) around the pure decisions of :mod:`.plan`.

* create / update / resume: apply the tiers' Deployments, Services and PDBs now;
* a timer (``SPECDEC_OPERATOR_INTERVAL_S``): re-apply drift and autoscale each tier from
  the load its replicas publish in Redis, with an Event for every scaling decision;
* what keeps a decoder from working (a Secret the operator cannot read, an invalid spec,
  pods that cannot be scheduled or started) is said in its conditions and, once, an Event;
* delete: remove the owned objects (owner references make the cluster's garbage
  collector do the same; deleting explicitly also covers clusters where it lags). kopf's
  finalizer (the timer needs one) holds a deleted resource until this has run, so the
  chart's pre-delete hook (:mod:`.uninstall`) deletes the resources while the operator
  still runs, and strips the finalizer of any it could not wait for.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any, TypeAlias

import aiohttp
import kopf
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from specdec_records import connect_async
from specdec_records.connect import OPERATOR

from . import metrics, resources
from .config import OperatorConfig
from .kube import ApiError, Kube, SecretProblem
from .load import read_loads
from .plan import (
    Fault,
    TierPlan,
    current_replicas,
    decoder_status,
    invalid_spec_conditions,
    new_faults,
    plan_tier,
    pod_faults,
    ready_replicas,
)
from .policy import TIERS, Coupling, Decision, History, ReplicaLoad, decide
from .spec import GROUP, PLURAL, VERSION, DecoderSpec, parse

Logger: TypeAlias = logging.Logger | logging.LoggerAdapter[Any]  # what kopf passes handlers
CONFIG = OperatorConfig.from_env()
# The default Redis of resources naming none: its password reaches their tiers only by secretKeyRef.
DEFAULT_REDIS = resources.DefaultRedis(
    CONFIG.default_redis_url, CONFIG.default_redis_secret, CONFIG.default_kv_redis_secret
)
KUBE = Kube()
KINDS = ("Deployment", "Service", "PodDisruptionBudget")


class State:
    """Per-object, in-memory: the stabilization histories and the Redis client."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.histories: dict[str, History] = {}
        self.redis: aioredis.Redis | None = None
        self.redis_url: str | None = None
        self.said: set[str] = set()  # messages of the faults an Event already said

    def unsaid(self, old_conditions: list[Any], faults: list[Fault]) -> list[Fault]:
        """The faults no Event said yet (here, or before a restart per the conditions)."""
        new = [f for f in new_faults(old_conditions, faults) if f.message not in self.said]
        self.said = {f.message for f in faults}
        return new

    def history(self, tier: str) -> History:
        return self.histories.setdefault(tier, History(started_at=time.monotonic()))

    async def client(self, url: str) -> aioredis.Redis:
        if self.redis is None or url != self.redis_url:
            await self.close()
            self.redis = connect_async(url, OPERATOR)  # AUTH from the URL; rediss:// with SPECDEC_REDIS_CA
            self.redis_url = url
        return self.redis

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None


def _state(memo: kopf.Memo) -> State:
    state = memo.get("specdec")
    if not isinstance(state, State):
        state = memo["specdec"] = State()
    return state


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "specdec-operator"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # A peer silent this long is dead: the standby takes over within it (keepalives come
    # every lifetime - 5..10 s; a pod stopped gracefully leaves at once).
    settings.peering.lifetime = CONFIG.peering_lifetime_s
    metrics.serve(CONFIG.metrics_port)


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
async def apply_handler(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, logger: Logger, **_: Any) -> None:
    await reconcile(body, memo, patch, logger, autoscale=False)


@kopf.timer(GROUP, VERSION, PLURAL, interval=CONFIG.interval_s, initial_delay=CONFIG.interval_s)
async def autoscale_timer(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, logger: Logger, **_: Any) -> None:
    await reconcile(body, memo, patch, logger, autoscale=True)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete_handler(body: kopf.Body, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    for tier in TIERS:
        for kind in KINDS:
            if await KUBE.delete(kind, ns, resources.child_name(name, tier)):
                logger.info("deleted %s %s", kind, resources.child_name(name, tier))
    metrics.forget(ns, name)
    await _state(memo).close()


async def redis_url(spec: DecoderSpec, namespace: str) -> str | None:
    """The Redis URL autoscaling reads; :class:`SecretProblem` if its Secret cannot be read."""
    if spec.redis_url:
        return spec.redis_url
    if spec.redis_secret:
        secret, key = spec.redis_secret
        return await KUBE.secret_value(namespace, secret, key)
    return CONFIG.default_redis_url


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def reconcile(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, logger: Logger, *, autoscale: bool) -> None:
    """Apply every tier; with ``autoscale``, first resize each one from its load in Redis."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    old_status = dict(body.get("status") or {})
    state = _state(memo)
    spec = _parse(body, patch, old_status, state, autoscale=autoscale)
    if spec is None:
        metrics.RECONCILES.labels("timer" if autoscale else "change", "invalid").inc()
        return
    async with state.lock:
        faults: list[Fault] = []
        try:
            url = await redis_url(spec, ns)
        except SecretProblem as exc:  # the tiers still deploy; autoscaling waits for the Secret
            url = None
            faults.append(Fault(exc.reason, f"{exc}; autoscaling paused"))
        loads: dict[str, list[ReplicaLoad]] = {t: [] for t in TIERS}
        problems: list[str] = []
        redis_problem = "Redis URL unreadable" if faults else None
        if autoscale and not faults:
            loads, redis_problem = await read_tier_loads(state, url, resources.redis_prefix(ns, name))
            problems += [redis_problem] if redis_problem else []
        await apply_model_cache(body, spec)
        old_tiers = old_status.get("tiers") or {}
        tiers_status: dict[str, Any] = {}
        decisions: list[Decision] = []
        for tier in TIERS:
            if tier not in spec.active_tiers:
                await remove_tier(ns, resources.child_name(name, tier))
                continue
            # No loads (Redis unreachable or unnamed) pause autoscaling; a tier's silent
            # replicas are that tier's own business (the policy counts them as missing).
            plan, decision = await reconcile_tier(
                body,
                spec,
                tier,
                old_tiers.get(tier) or {},
                loads,
                state,
                logger,
                autoscale=autoscale,
                paused=redis_problem is not None,
            )
            if decision is not None:
                decisions.append(decision)
            problems += [plan.problem] if plan.problem else []
            tiers_status[tier] = plan.status
            faults += await tier_faults(ns, name, tier)
        old_conditions = old_status.get("conditions") or []
        for fault in state.unsaid(old_conditions, faults):
            kopf.warn(body, reason=fault.reason, message=fault.message)
            logger.warning(fault.message)
        patch.status.update(
            decoder_status(meta.get("generation"), tiers_status, decisions, problems, old_conditions, _now(), faults)
        )
        observe(ns, name, tiers_status, faults)
        metrics.RECONCILES.labels("timer" if autoscale else "change", "ok").inc()
        if problems and autoscale:
            logger.warning("; ".join(problems))


def observe(ns: str, name: str, tiers: Mapping[str, Mapping[str, Any]], faults: list[Fault]) -> None:
    """The decoder's gauges: each tier's desired/ready replicas, its faults by reason."""
    for tier, s in tiers.items():
        metrics.DESIRED.labels(ns, name, tier).set(s.get("desiredReplicas") or 0)
        metrics.READY.labels(ns, name, tier).set(s.get("readyReplicas") or 0)
    reasons = {f.reason for f in faults}
    for labels in list(metrics.FAULTS._metrics):
        if labels[:2] == (ns, name) and labels[2] not in reasons:
            metrics.FAULTS.labels(*labels).set(0)
    for reason in reasons:
        metrics.FAULTS.labels(ns, name, reason).set(sum(f.reason == reason for f in faults))


async def tier_faults(ns: str, name: str, tier: str) -> list[Fault]:
    """What the tier's pods say is wrong (unschedulable, cannot start); none if unreadable."""
    try:
        pods = await KUBE.list("Pod", ns, resources.selector(name, tier))
    except (ApiError, aiohttp.ClientError) as exc:
        logging.getLogger(__name__).debug("listing %s pods: %s", tier, exc)
        return []
    return pod_faults(tier, pods)


async def apply_model_cache(body: kopf.Body, spec: DecoderSpec) -> None:
    """Create the model-cache PVC the spec asks for (a PVC's spec is not re-applied)."""
    meta = body["metadata"]
    owner = {"metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]}}
    pvc = resources.model_cache_pvc(owner, spec)
    if pvc is None or await KUBE.get("PersistentVolumeClaim", meta["namespace"], pvc["metadata"]["name"]):
        return
    try:
        await KUBE.apply(pvc)
    except ApiError as exc:
        raise kopf.TemporaryError(f"creating PVC {pvc['metadata']['name']}: {exc}", delay=10) from exc
    kopf.info(body, reason="ModelCacheCreated", message=f"created PVC {pvc['metadata']['name']}")


def _parse(
    body: kopf.Body, patch: kopf.Patch, old_status: Mapping[str, Any], state: State, *, autoscale: bool
) -> DecoderSpec | None:
    """The parsed spec; if it is invalid, conditions say so, an Event says so once, and
    create/update fail for good (the timer keeps the conditions)."""
    generation = body["metadata"].get("generation")
    try:
        return parse(body.get("spec") or {})
    except ValueError as exc:
        old = old_status.get("conditions") or []
        patch.status["conditions"] = invalid_spec_conditions(old, str(exc), _now(), generation)
        patch.status["observedGeneration"] = generation
        if state.unsaid(old, [Fault("InvalidSpec", str(exc))]):
            kopf.warn(body, reason="InvalidSpec", message=str(exc))
        if autoscale:
            return None
        raise kopf.PermanentError(str(exc)) from exc


async def read_tier_loads(
    state: State, url: str | None, prefix: str
) -> tuple[dict[str, list[ReplicaLoad]], str | None]:
    """Each tier's live heartbeats, or none and the problem that pauses autoscaling."""
    none: dict[str, list[ReplicaLoad]] = {t: [] for t in TIERS}
    if url is None:
        return none, "no Redis URL: autoscaling paused"
    try:
        return await read_loads(await state.client(url), prefix, CONFIG.heartbeat_max_age_s), None
    except (RedisError, OSError) as exc:
        return none, f"Redis unreachable, autoscaling paused: {exc}"
    except ValueError as exc:  # not a Redis URL, or its TLS files missing (the connector names which)
        return none, f"Redis URL unusable, autoscaling paused: {exc}"


async def reconcile_tier(
    body: kopf.Body,
    spec: DecoderSpec,
    tier: str,
    old_status: Mapping[str, Any],
    loads: Mapping[str, list[ReplicaLoad]],
    state: State,
    logger: Logger,
    *,
    autoscale: bool,
    paused: bool,
) -> tuple[TierPlan, Decision | None]:
    """Decide one tier's replicas (Event if it scales), apply its objects, report drift."""
    meta = body["metadata"]
    ns, child = meta["namespace"], resources.child_name(meta["name"], tier)
    t = spec.tiers[tier]
    live = await KUBE.get("Deployment", ns, child)
    current = current_replicas(live, t)
    decision = None
    if autoscale and t.autoscaling_enabled and t.operator_scales and not paused:
        coupled = (
            None
            if tier != "draft"
            else Coupling.of_target(loads["target"], spec.draft_length, t.draft_tokens_per_s_per_replica)
        )
        decision = decide(tier, t.policy, loads[tier], current, state.history(tier), time.monotonic(), coupled)
    plan = plan_tier(t, current, ready_replicas(live), old_status, decision, _now())
    if plan.event is not None:
        kopf.event(body, type="Normal", reason=plan.event[0], message=plan.event[1])
        logger.info(plan.event[1])
        metrics.SCALING.labels(ns, meta["name"], tier, "up" if plan.replicas > current else "down").inc()
    owner = {"metadata": {"name": meta["name"], "namespace": ns, "uid": meta["uid"]}}
    # autoscaling.mode external: replicas is not ours to set (an HPA or KEDA object owns it).
    replicas = plan.replicas if t.operator_scales else None
    wanted = [
        resources.deployment(owner, spec, tier, replicas, run_as_user=CONFIG.run_as_user, default_redis=DEFAULT_REDIS),
        resources.service(owner, spec, tier),
        resources.pdb(owner, spec, tier),
    ]
    created, corrected = await apply_wanted(wanted, live, current)
    for kind in created:
        logger.info("created %s %s", kind, child)
    for kind in corrected if autoscale else ():
        kopf.event(body, type="Normal", reason="DriftCorrected", message=f"re-applied {kind} {child}")
    return plan, decision


async def apply_wanted(
    wanted: list[dict[str, Any]], live: Mapping[str, Any] | None, current: int
) -> tuple[list[str], list[str]]:
    """Apply each object that is missing or differs from the cluster.

    ``live`` is the tier's Deployment as read before (None: absent), ``current`` its
    replica count then. Returns the kinds created and the kinds whose drift was corrected
    (a Deployment's new replica count alone is scaling, not drift).
    """
    created, corrected = [], []
    for obj in wanted:
        kind, obj_name = obj["kind"], obj["metadata"]["name"]
        have = live if kind == "Deployment" else await KUBE.get(kind, obj["metadata"]["namespace"], obj_name)
        if have is not None and not resources.drifted(obj, have):
            continue
        try:
            await KUBE.apply(obj)
        except ApiError as exc:
            raise kopf.TemporaryError(f"applying {kind} {obj_name}: {exc}", delay=5) from exc
        if have is None:
            created.append(kind)
        elif resources.drifted_beyond_scale(obj, have, current):
            corrected.append(kind)
    return created, corrected


async def remove_tier(namespace: str, child: str) -> None:
    """Delete a tier's objects (a tier the spec no longer runs)."""
    for kind in KINDS:
        await KUBE.delete(kind, namespace, child)
