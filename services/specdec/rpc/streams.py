"""Multiplexed bidirectional streams between the coordinator and a tier.

Many sessions share one long-lived stream per replica. The client tags each item and
coalesces whatever is queued into one message; the server handles items concurrently
(they meet again in the tier's micro-batcher) and answers each with its tag.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.rpc.auth import INTERNAL_TOKEN_HEADER
from specdec.rpc.options import add_metadata, client_options
from specdec.rpc.tls import TIER_SERVER_NAME, TlsFiles, channel_credentials

log = logging.getLogger(__name__)


CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Dial:
    """How the coordinator reaches a tier: over mTLS with its own certificate (the tier's
    must carry TIER_SERVER_NAME and be signed by the CA), or in plaintext with the shared
    internal token the tiers ask for when TLS is off."""

    tls: TlsFiles | None = None
    token: str = ""

    def channel(self, address: str) -> grpc.aio.Channel:
        interceptors = add_metadata(((INTERNAL_TOKEN_HEADER, self.token),)) if self.token else None
        if self.tls is not None and self.tls.enabled:
            options = [*client_options(), ("grpc.ssl_target_name_override", TIER_SERVER_NAME)]
            return grpc.aio.secure_channel(
                address, channel_credentials(self.tls), options=options, interceptors=interceptors
            )
        return grpc.aio.insecure_channel(address, options=client_options(), interceptors=interceptors)


class ReplicaFailed(RuntimeError):
    """The stream to a replica broke; pending calls should go elsewhere."""


async def serve_tagged(
    requests: AsyncIterator[Any],
    handle: Callable[[Any], Awaitable[Any]],
    failed: Callable[[Any, Exception], Any],
    release: Callable[[list[str]], Awaitable[None]],
    respond: Callable[[list[Any]], Any],
    closing: asyncio.Event | None = None,
    abandoned: asyncio.Event | None = None,
) -> AsyncIterator[Any]:
    """Server side: yield responses as items finish until the client half-closes. An item
    whose handler raises is answered with `failed(item, exc)` (an error result), so one bad
    item never stalls or breaks the stream. Once `closing` is set (the replica drains), items
    in flight are answered, nothing more is read, and the stream ends: the client fails
    those sessions over. Once `abandoned` is set (the compute thread is stuck), the stream
    ends at once without waiting for answers that may never come."""
    results: asyncio.Queue[Any] = asyncio.Queue()
    pending: set[asyncio.Task[None]] = set()
    # A release can overtake its session's last item (items run concurrently, releases at
    # once): it waits for that item, or the item would recreate the session for good.
    in_flight: Counter[str] = Counter()
    deferred: set[str] = set()

    async def run(item: Any) -> None:
        try:
            result = await handle(item)
        except Exception as exc:
            log.exception("item of session %s failed", str(getattr(item, "session_id", "?"))[:64])
            result = failed(item, exc)
        finally:
            await settle(item.session_id)
        await results.put(result)

    async def settle(session_id: str) -> None:
        """One item of the session is done: a release that waited for it runs now."""
        in_flight[session_id] -= 1
        if in_flight[session_id] > 0:
            return
        del in_flight[session_id]
        if session_id in deferred:
            deferred.discard(session_id)
            try:
                await release([session_id])
            except Exception:  # the item's answer must still go out
                log.exception("release of session %s failed", session_id[:64])

    async def read() -> None:
        async for request in requests:
            now = [s for s in request.release_session_ids if s not in in_flight]
            deferred.update(s for s in request.release_session_ids if s in in_flight)
            if now:
                await release(now)
            for item in request.items:
                in_flight[item.session_id] += 1
                task = asyncio.create_task(run(item))
                pending.add(task)
                task.add_done_callback(pending.discard)

    reader = asyncio.create_task(read())
    stopper = asyncio.create_task((closing or asyncio.Event()).wait())
    giving_up = asyncio.create_task((abandoned or asyncio.Event()).wait())
    try:
        while True:
            getter = asyncio.create_task(results.get())
            done, _ = await asyncio.wait({getter, reader, stopper, giving_up}, return_when=asyncio.FIRST_COMPLETED)
            if giving_up in done:
                getter.cancel()
                return
            if getter in done:
                batch = [getter.result()]
                while not results.empty():
                    batch.append(results.get_nowait())
                yield respond(batch)
                continue
            getter.cancel()
            if stopper in done:  # draining: answer what is in flight, then end the stream
                reader.cancel()
                if pending:
                    await asyncio.wait(set(pending))
                batch = []
                while not results.empty():
                    batch.append(results.get_nowait())
                if batch:
                    yield respond(batch)
                return
            error = reader.exception()
            if error is not None:
                raise error
            if pending:
                await asyncio.wait(set(pending))
            elif results.empty():
                return
    finally:
        reader.cancel()
        stopper.cancel()
        giving_up.cancel()
        for task in pending:
            task.cancel()


class TaggedStreamClient:
    """Client side of one replica's stream."""

    def __init__(
        self,
        address: str,
        open_stream: Callable[[grpc.aio.Channel], Any],
        make_request: Callable[[list[Any], list[str]], Any],
        dial: Dial | None = None,
    ) -> None:
        self.address = address
        self._channel = (dial or Dial()).channel(address)
        self._open_stream = open_stream
        self._make_request = make_request
        self._tags = itertools.count(1)
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._outbox: list[Any] = []
        self._releases: list[str] = []
        self._wakeup = asyncio.Event()
        self._call: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = False
        self.failed: Exception | None = None

    @property
    def in_flight(self) -> int:
        return len(self._futures)

    def _ensure_open(self) -> None:
        if self._call is None:
            self._call = self._open_stream(self._channel)
            self._tasks = [asyncio.create_task(self._write_loop()), asyncio.create_task(self._read_loop())]

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Wait until the replica answers at the HTTP/2 level; ReplicaFailed after timeout_s
        (an address that accepts TCP and never answers costs one timeout, not a call's)."""
        if self._connected:
            return
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout_s)
        except TimeoutError:
            self._fail(ReplicaFailed(f"no answer within {timeout_s:.0f} s"))
            raise ReplicaFailed(f"{self.address}: no answer within {timeout_s:.0f} s") from None
        self._connected = True

    async def serving(self, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
        """Whether the replica answers its health check with SERVING (a stuck or draining
        replica answers NOT_SERVING while its port is still open)."""
        try:
            await self.connect(timeout_s)
            reply = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except (ReplicaFailed, grpc.RpcError):
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def call(self, build_item: Callable[[int], Any]) -> Any:
        if self.failed is not None:
            raise ReplicaFailed(f"{self.address}: {self.failed}")
        await self.connect()
        self._ensure_open()
        tag = next(self._tags)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[tag] = future
        self._outbox.append(build_item(tag))
        self._wakeup.set()
        try:
            return await future
        finally:
            self._futures.pop(tag, None)

    def release(self, session_id: str) -> bool:
        """Queue a release for the next message (opening the stream if need be); False when
        this stream has failed (the caller should use a fresh client)."""
        if self.failed is not None:
            return False
        self._ensure_open()
        self._releases.append(session_id)
        self._wakeup.set()
        return True

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                items, self._outbox = self._outbox, []
                releases, self._releases = self._releases, []
                if items or releases:
                    await self._call.write(self._make_request(items, releases))
        except Exception as exc:
            self._fail(exc)

    async def _read_loop(self) -> None:
        try:
            async for response in self._call:
                for result in response.results:
                    future = self._futures.get(result.tag)
                    if future is not None and not future.done():
                        future.set_result(result)
            self._fail(ReplicaFailed("stream closed by the replica"))
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        if self.failed is None:
            self.failed = exc
            log.warning("stream to %s failed: %s", self.address, exc)
        for future in self._futures.values():
            if not future.done():
                future.set_exception(ReplicaFailed(f"{self.address}: {exc}"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._call is not None:
            self._call.cancel()
        await self._channel.close()
