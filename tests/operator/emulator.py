"""kmock's Kubernetes emulator, with the fixes kopf needs, served from a thread.

kmock 0.8's ``KubernetesEmulator`` stores objects and serves list/watch/patch/delete, but
never sets ``uid``/``creationTimestamp``/``resourceVersion``/``generation``, ignores
``generateName``, cannot apply JSON patches (kopf uses one, guarded by a
``resourceVersion`` test, to remove its finalizer), and replays every object as ADDED
on each new watch. :class:`FixedEmulator` fills those gaps (and forgets served requests,
which kmock would keep and rescan on every new one); no controllers run, so there are no
Pods, no ``readyReplicas`` and no garbage collection.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import threading
import urllib.error
import urllib.request
import uuid
from typing import Any

import attrs
import kmock
from kmock._internal import enums

RESOURCES = {
    "specdec.io/v1alpha1/speculativedecoders": dict(
        kind="SpeculativeDecoder", namespaced=True, singular="speculativedecoder", subresources={"status"}
    ),
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True, singular="deployment"),
    "v1/services": dict(kind="Service", namespaced=True, singular="service"),
    "policy/v1/poddisruptionbudgets": dict(kind="PodDisruptionBudget", namespaced=True, singular="poddisruptionbudget"),
    "v1/events": dict(kind="Event", namespaced=True, singular="event"),
    "v1/secrets": dict(kind="Secret", namespaced=True, singular="secret"),
    "v1/pods": dict(kind="Pod", namespaced=True, singular="pod"),
    "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim", namespaced=True, singular="persistentvolumeclaim"),
    "kopf.dev/v1/clusterkopfpeerings": dict(kind="ClusterKopfPeering", namespaced=False, singular="clusterkopfpeering"),
    "kopf.dev/v1/kopfpeerings": dict(kind="KopfPeering", namespaced=True, singular="kopfpeering"),
    # kopf waits for namespaces in discovery even cluster-wide; run it with --all-namespaces:
    # kmock 0.8 cannot parse /api/v1/namespaces, which kopf lists for --namespace.
    "v1/namespaces": dict(kind="Namespace", namespaced=False, singular="namespace"),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(
        kind="CustomResourceDefinition", namespaced=False, singular="customresourcedefinition"
    ),
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


class JsonPatchConflict(Exception):
    pass


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/remove/replace/test on a copy (enough for kopf)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1] if parts else ""
        if op["op"] == "test":
            cur = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if cur != op.get("value"):
                raise JsonPatchConflict(f"test failed at {op['path']}: {cur!r} != {op.get('value')!r}")
        elif op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                idx = len(parent) if last == "-" else int(last)
                if op["op"] == "add":
                    parent.insert(idx, op["value"])
                else:
                    parent[idx] = op["value"]
            else:
                parent[last] = op["value"]
        elif op["op"] == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                parent.pop(last, None)
        else:
            raise JsonPatchConflict(f"unsupported op {op['op']}")
    return doc


def merge_diff(old: Any, new: Any) -> Any:
    """A merge patch turning ``old`` into ``new`` (None deletes a key)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    out = {k: None for k in old if k not in new}
    for k, v in new.items():
        if k not in old:
            out[k] = copy.deepcopy(v)
        elif old[k] != v:
            out[k] = merge_diff(old[k], v)
    return out


@attrs.define(kw_only=True)
class FixedEmulator(kmock.KubernetesEmulator):
    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _current: int = attrs.field(default=0, init=False)
    # (plural, namespace, name) of objects every request for answers 403, as RBAC would.
    forbidden: set[tuple[str, str, str]] = attrs.field(factory=set, init=False)

    def _next(self) -> str:
        self._current = next(self._versions)
        return str(self._current)

    def _stored(self, request: kmock.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        try:
            obj = self.objects[key]
        except (KeyError, LookupError):
            return None
        return None if obj.deleted else obj.raw

    async def _handle(self, request: kmock.Request):  # type: ignore[override]
        if (
            request.resource is not None
            and request.name is not None
            and (getattr(request.resource, "plural", None), request.namespace, request.name) in self.forbidden
        ):
            self._forget(request)
            raise kmock.KubernetesError(
                status=403, reason="Forbidden", message=f"forbidden: {request.resource.plural} {request.name!r}"
            )
        if request.resource is not None:
            try:
                async with self._lock:
                    await self._prepare(request)
            except JsonPatchConflict as exc:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc
        try:
            return await super()._handle(request)
        finally:
            self._forget(request)

    def _forget(self, request: kmock.Request) -> None:
        """Drop a served request from kmock's history.

        kmock keeps every request for assertions (which these tests do not make) and
        matches each new request by scanning that whole history: served requests would
        make every request slower than the last. In-flight ones (watches) stay.
        """
        for i, seen in enumerate(self._requests):
            if seen is request:
                del self._requests[i]
                return

    async def _prepare(self, request: kmock.Request) -> None:
        data = request.data
        if request.action == enums.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta["generation"] = 1
            meta["resourceVersion"] = self._next()
        elif request.action == enums.action.UPDATE and request.name is not None:
            current = self._stored(request)
            if current is None:
                return  # the parent raises 404
            if isinstance(data, list):  # JSON patch
                data = merge_diff(current, apply_json_patch(current, data))
            elif not isinstance(data, dict):
                return
            data = dict(data)
            if request.subresource == "status":
                data = {"status": data.get("status")}
            meta = dict(data.get("metadata") or {})
            for k in ("uid", "creationTimestamp", "generation"):
                meta.pop(k, None)
            if (
                request.subresource is None
                and "spec" in data
                and merge_diff(current.get("spec"), apply_merge(current.get("spec"), data["spec"]))
            ):
                meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
            meta["resourceVersion"] = self._next()
            data["metadata"] = meta
            object.__setattr__(request, "data", data)
        elif request.action == enums.action.DELETE and request.name is not None:
            current = self._stored(request)
            if (
                current is not None
                and current["metadata"].get("finalizers")
                and not current["metadata"].get("deletionTimestamp")
            ):
                # Mark for deletion with a fresh resourceVersion (the parent does not bump it).
                obj = self.objects[(request.resource, request.namespace, request.name)]
                obj.patch(
                    {
                        "metadata": {
                            "deletionTimestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                            "resourceVersion": self._next(),
                        }
                    }
                )
                await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})

    async def _serve_list(self, request: kmock.Request):  # type: ignore[override]
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = str(self._current)
        return result

    async def _serve_watch(self, request: kmock.Request):  # type: ignore[override]
        since = int(request.params.get("resourceVersion") or 0)
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and event.get("type") == "ADDED":
                rv = int(event["object"].get("metadata", {}).get("resourceVersion") or 0)
                if rv and rv <= since:
                    continue
            yield event


def apply_merge(base: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = apply_merge(out.get(k), v)
    return out


class EmulatorThread:
    """The emulator on a loopback port, in its own event loop thread, with a tiny client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="kmock", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with FixedEmulator() as emulator, kmock.Server(emulator) as server:
            for res, info in RESOURCES.items():
                emulator.resources[res] = kmock.ResourceInfo(verbs=VERBS, **info)
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> EmulatorThread:
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("kmock emulator did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)

    # ---- a blocking client for the test thread ----

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=10) as rsp:
                text = rsp.read()
                return json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
