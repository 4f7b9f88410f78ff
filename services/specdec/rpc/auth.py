"""Who may call what, checked before any handler runs.

* Health and reflection stay open (probes, grpcurl).
* The public API (coordinator): with API keys configured, every call carries
  `authorization: Bearer KEY`; the key's SHA-256 is compared in constant time against the
  hashes in SPECDEC_API_KEYS_FILE (one hex digest a line, `specdec hash-key` prints one),
  re-read when the file changes (a rotated Secret: no restart). Missing or wrong:
  UNAUTHENTICATED. Optionally at most N concurrent calls per key: RESOURCE_EXHAUSTED past that.
* The internal tiers (draft, target) serve coordinators only: under TLS the peer's client
  certificate must name `COORDINATOR_PEER_NAME` (and the CA must have signed it: the
  handshake checked that); without TLS the call must carry the shared internal token.
  Anyone else: PERMISSION_DENIED. Only an authenticated coordinator can advance or
  release a session.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from specdec.rpc.tls import COORDINATOR_PEER_NAME, peer_common_name

log = logging.getLogger(__name__)
KEYS_POLL_S = 1.0  # the keys file is stat()ed at most this often
OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")
INTERNAL_TOKEN_HEADER = "x-specdec-internal-token"


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_key_hashes(path: str) -> list[bytes]:
    """The SHA-256 digests in an API-keys file: one hex digest a line, `#` comments."""
    hashes = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            digest = bytes.fromhex(line.removeprefix("sha256:"))
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ValueError(f"{path}:{n}: not a hex SHA-256 digest")
        hashes.append(digest)
    return hashes


@dataclass
class AccessPolicy:
    internal: bool = False  # a draft/target tier: coordinators only
    key_hashes: list[bytes] = field(default_factory=list)  # public API keys (empty: no keys asked)
    max_calls_per_key: int = 0  # 0 = no limit
    internal_token: str = ""  # without TLS: what an internal caller must send
    tls: bool = False  # peers come over mTLS: check their certificate's name
    keys_file: str = ""  # where key_hashes came from: re-read when it changes
    _keys_mtime: int = field(default=0, repr=False)
    _keys_checked: float = field(default=0.0, repr=False)

    def digests(self) -> list[bytes]:
        """The API key digests in force, the keys file re-read if it changed since (a
        Kubernetes Secret is rotated in place). A file broken half way keeps the old keys."""
        now = time.monotonic()
        if self.keys_file and now - self._keys_checked >= KEYS_POLL_S:
            self._keys_checked = now
            try:
                mtime = os.stat(self.keys_file).st_mtime_ns
                if mtime != self._keys_mtime:
                    self.key_hashes, self._keys_mtime = load_key_hashes(self.keys_file), mtime
                    log.info("API keys file changed: %d keys loaded", len(self.key_hashes))
            except (OSError, ValueError) as exc:
                log.warning("API keys file unreadable, keeping the current keys: %s", exc)
        return self.key_hashes

    def key_ok(self, key: str) -> bytes | None:
        """The key's digest if it is one of ours (every stored digest compared, in constant time)."""
        digest = hashlib.sha256(key.encode()).digest()
        found = False
        for stored in self.digests():
            found |= hmac.compare_digest(digest, stored)
        return digest if found else None


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy
        self.calls: Counter[bytes] = Counter()  # calls in flight per API key digest

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN):
            return handler
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        policy = self.policy
        if policy.internal:
            if policy.tls:
                return _wrap(handler, self._check_peer, None)
            if policy.internal_token and not hmac.compare_digest(
                metadata.get(INTERNAL_TOKEN_HEADER, "").encode(), policy.internal_token.encode()
            ):
                return _deny(handler, grpc.StatusCode.PERMISSION_DENIED, "this tier serves coordinators only")
            return handler
        if not policy.digests():
            return handler
        scheme, _, key = metadata.get("authorization", "").partition(" ")
        digest = policy.key_ok(key.strip()) if scheme.lower() == "bearer" else None
        if digest is None:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")
        if policy.max_calls_per_key:
            return _wrap(handler, lambda context: self._enter(digest, context), lambda: self._leave(digest))
        return handler

    async def _check_peer(self, context: grpc.aio.ServicerContext) -> None:
        if peer_common_name(context) != COORDINATOR_PEER_NAME:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this tier serves coordinators only")

    async def _enter(self, digest: bytes, context: grpc.aio.ServicerContext) -> None:
        if self.calls[digest] >= self.policy.max_calls_per_key:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self.policy.max_calls_per_key} concurrent calls per API key",
            )
        self.calls[digest] += 1

    def _leave(self, digest: bytes) -> None:
        self.calls[digest] -= 1
        if self.calls[digest] <= 0:
            del self.calls[digest]


Before = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


def _wrap(handler: Any, before: Before, after: Callable[[], None] | None) -> Any:
    """`handler` with `before(context)` run first (it may abort) and `after()` once it ends."""
    kind = _kind(handler)
    behavior = getattr(handler, kind)

    if handler.response_streaming:

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await before(context)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                if after is not None:
                    after()

        wrapped: Callable[..., Any] = streaming
    else:

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await before(context)
            try:
                return await behavior(request, context)
            finally:
                if after is not None:
                    after()

        wrapped = unary
    return _handler(kind, wrapped, handler)


def _deny(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    async def deny(context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return _wrap(handler, deny, None)


def _kind(handler: Any) -> str:
    return {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[(handler.request_streaming, handler.response_streaming)]


def _handler(kind: str, behavior: Callable[..., Any], like: Any) -> Any:
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behavior, request_deserializer=like.request_deserializer, response_serializer=like.response_serializer)
