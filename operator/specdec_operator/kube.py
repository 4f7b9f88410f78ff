"""A minimal async Kubernetes client for the objects the operator owns.

kopf keeps its own API client private, so the operator talks to the API with aiohttp,
using the credentials kopf's login handler produced (``kopf.ConnectionInfo``).
Writes use server-side apply (field manager ``specdec-operator``).
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from typing import Any

import aiohttp
import kopf

FIELD_MANAGER = "specdec-operator"
PATHS = {  # kind -> (API prefix, plural)
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "Secret": ("/api/v1", "secrets"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Pod": ("/api/v1", "pods"),
    "SpeculativeDecoder": ("/apis/specdec.io/v1alpha1", "speculativedecoders"),
}


class NotFound(Exception):
    pass


class ApiError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:300]}")
        self.status = status


class SecretProblem(Exception):
    """A Secret the operator needs that it cannot read: ``reason`` is a condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _ssl(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    ctx = ssl.create_default_context(cafile=info.ca_path)
    if info.ca_data:
        ctx.load_verify_locations(cadata=base64.b64decode(info.ca_data).decode())
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data and info.private_key_data:
        files = []
        for data in (info.certificate_data, info.private_key_data):
            with tempfile.NamedTemporaryFile(delete=False, suffix=".pem") as f:
                f.write(base64.b64decode(data))
            files.append(f.name)
        cert, key = files
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


class Kube:
    """GET / server-side apply / DELETE of namespaced objects by kind and name."""

    def __init__(self) -> None:
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None

    def configure(self, info: kopf.ConnectionInfo) -> None:
        self._info = info
        self._session = None  # rebuilt lazily in the running loop

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._info is None:
            raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=1)
        if self._session is None or self._session.closed:
            headers = {"Accept": "application/json"}
            if self._info.token:
                headers["Authorization"] = f"{self._info.scheme or 'Bearer'} {self._info.token}"
            auth = aiohttp.BasicAuth(self._info.username, self._info.password or "") if self._info.username else None
            self._session = aiohttp.ClientSession(
                base_url=None,
                headers=headers,
                auth=auth,
                connector=aiohttp.TCPConnector(ssl=_ssl(self._info)),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    def _url(self, kind: str, namespace: str | None, name: str | None = None) -> str:
        """The object's URL; ``namespace`` None (with no name): every namespace's list."""
        assert self._info is not None
        prefix, plural = PATHS[kind]
        where = f"/namespaces/{namespace}" if namespace is not None else ""
        url = f"{self._info.server.rstrip('/')}{prefix}{where}/{plural}"
        return f"{url}/{name}" if name else url

    async def _request(self, method: str, url: str, **kw: Any) -> dict[str, Any]:
        async with self._client().request(method, url, **kw) as rsp:
            text = await rsp.text()
            if rsp.status == 404:
                raise NotFound(url)
            if rsp.status >= 400:
                raise ApiError(rsp.status, text)
            return json.loads(text) if text else {}

    async def list(self, kind: str, namespace: str | None, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Objects of ``kind`` in ``namespace`` (None: all) carrying every label in ``labels``."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        items = (await self._request("GET", self._url(kind, namespace), params={"labelSelector": selector})).get(
            "items"
        ) or []
        # Emulators may ignore the selector: filter here as well.
        return [
            o
            for o in items
            if all(((o.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in labels.items())
        ]

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._request("GET", self._url(kind, namespace, name))
        except NotFound:
            return None

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply; creates the object where the server does not (emulators)."""
        meta = obj["metadata"]
        url = self._url(obj["kind"], meta["namespace"], meta["name"])
        try:
            return await self._request(
                "PATCH",
                url,
                data=json.dumps(obj),
                params={"fieldManager": FIELD_MANAGER, "force": "true"},
                headers={"Content-Type": "application/apply-patch+yaml"},
            )
        except NotFound:
            return await self._request(
                "POST",
                self._url(obj["kind"], meta["namespace"]),
                data=json.dumps(obj),
                params={"fieldManager": FIELD_MANAGER},
                headers={"Content-Type": "application/json"},
            )

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await self._request(
            "PATCH",
            self._url(kind, namespace, name),
            data=json.dumps(patch),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        try:
            await self._request("DELETE", self._url(kind, namespace, name), params={"propagationPolicy": "Foreground"})
            return True
        except NotFound:
            return False

    async def secret_value(self, namespace: str, name: str, key: str) -> str:
        """The decoded value of ``key`` in Secret ``name``; :class:`SecretProblem` says why not."""
        try:
            secret = await self.get("Secret", namespace, name)
        except ApiError as exc:
            if exc.status in (401, 403):
                raise SecretProblem(
                    "SecretForbidden",
                    f"the operator may not read Secret {namespace}/{name} "
                    f"(HTTP {exc.status}): list it in the chart's operator.secretNames",
                ) from exc
            raise
        if secret is None:
            raise SecretProblem("SecretNotFound", f"Secret {namespace}/{name} does not exist")
        if key not in (secret.get("data") or {}):
            raise SecretProblem("SecretKeyMissing", f"Secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(secret["data"][key]).decode()
