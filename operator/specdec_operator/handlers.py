"""kopf handlers: thin wrappers around :func:`reconcile`, which does the I/O of one pass
(Redis, the Kubernetes API, Events) around the pure decisions of :mod:`.plan`.

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
from .plan import (TierPlan, current_replicas, decoder_status, invalid_spec_conditions,
                   plan_tier, ready_replicas)
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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def reconcile(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch,
                    logger: logging.Logger, *, autoscale: bool) -> None:
    """Apply every tier; with ``autoscale``, first resize each one from its load in Redis."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    old_status = dict(body.get("status") or {})
    spec = _parse(body, patch, old_status, autoscale=autoscale)
    if spec is None:
        return
    state = _state(memo)
    async with state.lock:
        url = await redis_url(spec, ns)
        loads: dict[str, list[ReplicaLoad]] = {t: [] for t in TIERS}
        problems: list[str] = []
        redis_problem = None
        if autoscale:
            loads, redis_problem = await read_tier_loads(state, url, resources.redis_prefix(ns, name))
            problems += [redis_problem] if redis_problem else []
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
                body, spec, tier, old_tiers.get(tier) or {}, loads, state, logger,
                autoscale=autoscale, paused=redis_problem is not None)
            if decision is not None:
                decisions.append(decision)
            problems += [plan.problem] if plan.problem else []
            tiers_status[tier] = plan.status
        patch.status.update(decoder_status(
            meta.get("generation"), tiers_status, decisions, problems,
            old_status.get("conditions") or [], _now()))
        if problems and autoscale:
            logger.warning("; ".join(problems))


def _parse(body: kopf.Body, patch: kopf.Patch, old_status: Mapping[str, Any], *,
           autoscale: bool) -> DecoderSpec | None:
    """The parsed spec; if it is invalid, conditions say so and create/update fail for good."""
    try:
        return parse(body.get("spec") or {})
    except ValueError as exc:
        patch.status["conditions"] = invalid_spec_conditions(
            old_status.get("conditions") or [], str(exc), _now())
        if autoscale:
            return None
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        raise kopf.PermanentError(str(exc)) from exc


async def read_tier_loads(state: State, url: str | None, prefix: str
                          ) -> tuple[dict[str, list[ReplicaLoad]], str | None]:
    """Each tier's live heartbeats, or none and the problem that pauses autoscaling."""
    none: dict[str, list[ReplicaLoad]] = {t: [] for t in TIERS}
    if url is None:
        return none, "no Redis URL: autoscaling paused"
    try:
        return await read_loads(await state.client(url), prefix, CONFIG.heartbeat_max_age_s), None
    except (RedisError, OSError) as exc:
        return none, f"Redis unreachable, autoscaling paused: {exc}"


async def reconcile_tier(body: kopf.Body, spec: DecoderSpec, tier: str,
                         old_status: Mapping[str, Any], loads: Mapping[str, list[ReplicaLoad]],
                         state: State, logger: logging.Logger, *, autoscale: bool, paused: bool
                         ) -> tuple[TierPlan, Decision | None]:
    """Decide one tier's replicas (Event if it scales), apply its objects, report drift."""
    meta = body["metadata"]
    ns, child = meta["namespace"], resources.child_name(meta["name"], tier)
    t = spec.tiers[tier]
    live = await KUBE.get("Deployment", ns, child)
    current = current_replicas(live, t)
    decision = None
    if autoscale and t.autoscaling_enabled and not paused:
        coupled = None if tier != "draft" else Coupling.of_target(
            loads["target"], spec.draft_length, t.draft_tokens_per_s_per_replica)
        decision = decide(tier, t.policy, loads[tier], current, state.history(tier),
                          time.monotonic(), coupled)
    plan = plan_tier(t, current, ready_replicas(live), old_status, decision, _now())
    if plan.event is not None:
        kopf.event(body, type="Normal", reason=plan.event[0], message=plan.event[1])
        logger.info(plan.event[1])
    owner = {"metadata": {"name": meta["name"], "namespace": ns, "uid": meta["uid"]}}
    wanted = [resources.deployment(owner, spec, tier, plan.replicas, CONFIG.default_redis_url),
              resources.service(owner, spec, tier), resources.pdb(owner, spec, tier)]
    created, corrected = await apply_wanted(wanted, live, current)
    for kind in created:
        logger.info("created %s %s", kind, child)
    for kind in corrected if autoscale else ():
        kopf.event(body, type="Normal", reason="DriftCorrected",
                   message=f"re-applied {kind} {child}")
    return plan, decision


async def apply_wanted(wanted: list[dict[str, Any]], live: Mapping[str, Any] | None,
                       current: int) -> tuple[list[str], list[str]]:
    """Apply each object that is missing or differs from the cluster.

    ``live`` is the tier's Deployment as read before (None: absent), ``current`` its
    replica count then. Returns the kinds created and the kinds whose drift was corrected
    (a Deployment's new replica count alone is scaling, not drift).
    """
    created, corrected = [], []
    for obj in wanted:
        kind, obj_name = obj["kind"], obj["metadata"]["name"]
        have = live if kind == "Deployment" else \
            await KUBE.get(kind, obj["metadata"]["namespace"], obj_name)
        if have is not None and not resources.drifted(obj, have):
            continue
        try:
            await KUBE.apply(obj)
        except ApiError as exc:
            raise kopf.TemporaryError(f"applying {kind} {obj_name}: {exc}", delay=5)
        if have is None:
            created.append(kind)
        elif resources.drifted_beyond_scale(obj, have, current):
            corrected.append(kind)
    return created, corrected


async def remove_tier(namespace: str, child: str) -> None:
    """Delete a tier's objects (a tier the spec no longer runs)."""
    for kind in KINDS:
        await KUBE.delete(kind, namespace, child)
