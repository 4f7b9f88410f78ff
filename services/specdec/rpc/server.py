"""Bootstrap shared by every tier: aio server, health, reflection, registry heartbeat,
graceful SIGTERM, and a watchdog on the compute thread."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.config import Settings
from specdec.rpc.auth import AccessInterceptor, AccessPolicy, load_key_hashes
from specdec.rpc.options import INTERNAL_MAX_MESSAGE, server_options
from specdec.rpc.tls import TlsFiles, server_credentials
from specdec.state.registry import Heartbeat, Load, Registry, ReplicaInfo
from specdec.telemetry import server_interceptors
from specdec.telemetry import shutdown as telemetry_shutdown

log = logging.getLogger(__name__)


@dataclass
class Drain:
    """What a tier does on SIGTERM besides leaving the registry and reporting NOT_SERVING."""

    closing: asyncio.Event = field(default_factory=asyncio.Event)  # set: streams answer what they hold, then end
    flush: Callable[[], Awaitable[object]] | None = None  # once the streams ended: persist state (KV to Redis)
    # Set while the compute thread is stuck: streams end at once, without their answers
    # (which may never come), so the coordinator moves those sessions elsewhere.
    abandoned: asyncio.Event = field(default_factory=asyncio.Event)
    stalled: Callable[[], float] | None = None  # seconds the compute thread has been on one batch


def tls_files(settings: Settings) -> TlsFiles:
    return TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)


def access_policy(tier: str, settings: Settings) -> AccessPolicy:
    if tier != "coordinator":
        return AccessPolicy(internal=True, internal_token=settings.internal_token, tls=tls_files(settings).enabled)
    keys = load_key_hashes(settings.api_keys_file) if settings.api_keys_file else []  # a bad file fails the start
    return AccessPolicy(key_hashes=keys, keys_file=settings.api_keys_file, max_calls_per_key=settings.api_key_max_calls)


class Companion(Protocol):
    """Another server of the tier's process (the coordinator's HTTP front)."""

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None: ...


class TierServer:
    """One tier's gRPC server and its registry entry."""

    def __init__(
        self,
        tier: str,
        settings: Settings,
        service_names: list[str],
        add_servicers: Callable[[grpc.aio.Server], None],
        load: Callable[[], Load],
        model: str = "",
        drafters: list[str] | None = None,
        drain: Drain | None = None,
    ) -> None:
        self.tier, self.settings, self.service_names = tier, settings, service_names
        self.drain = drain
        max_message = settings.max_request_bytes if tier == "coordinator" else INTERNAL_MAX_MESSAGE
        tls = tls_files(settings)
        interceptors = [AccessInterceptor(access_policy(tier, settings)), *server_interceptors()]
        self.server = grpc.aio.server(options=server_options(max_message), interceptors=interceptors)
        add_servicers(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if tier == "coordinator" or settings.reflection:
            reflection.enable_server_reflection(
                [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
                self.server,
            )
        address = f"{settings.host}:{settings.port_for(tier)}"
        self.port = (
            self.server.add_secure_port(address, server_credentials(tls, settings.tls_client_auth))
            if tls.enabled
            else self.server.add_insecure_port(address)
        )
        self.address = f"{settings.advertise_host or settings.host}:{self.port}"
        self.info = ReplicaInfo(
            tier=tier, address=self.address, model=model, drafters=drafters or [], heartbeat_s=settings.heartbeat_s
        )
        self.registry = Registry(settings.redis_url, settings.redis_prefix) if settings.redis_url else None
        self.heartbeat = Heartbeat(self.registry, self.info, load, settings.heartbeat_s) if self.registry else None
        self._watchdog: asyncio.Task[None] | None = None
        self.companions: list[Companion] = []  # started before SERVING, drained with the gRPC server

    async def start(self) -> None:
        await self.server.start()
        for companion in self.companions:
            await companion.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.heartbeat is not None:
            self.heartbeat.start()
        if self.drain is not None and self.drain.stalled is not None and self.settings.watchdog_s > 0:
            self._watchdog = asyncio.create_task(self._watch(self.drain, self.settings.watchdog_s))
        log.info("%s tier serving on %s", self.tier, self.address)

    async def _watch(self, drain: Drain, limit_s: float) -> None:
        """A compute thread stuck on one batch for `limit_s` (a hung kernel, a deadlock) makes
        the replica NOT_SERVING and takes it out of the registry: traffic moves elsewhere and
        a liveness probe restarts it. If the batch finishes after all, it serves again."""
        assert drain.stalled is not None
        stuck = False
        while True:
            await asyncio.sleep(min(1.0, limit_s / 4))
            now_stuck = drain.stalled() > limit_s
            if now_stuck == stuck:
                continue
            stuck = now_stuck
            status = health_pb2.HealthCheckResponse.NOT_SERVING if stuck else health_pb2.HealthCheckResponse.SERVING
            for name in ["", *self.service_names]:
                await self.health.set(name, status)
            if stuck:
                log.error("%s tier: compute thread stuck for over %.0f s; NOT_SERVING", self.tier, limit_s)
                drain.abandoned.set()
                if self.heartbeat is not None:
                    await self.heartbeat.stop()
            else:
                log.warning("%s tier: compute thread moving again; SERVING", self.tier)
                drain.abandoned.clear()
                if self.heartbeat is not None:
                    self.heartbeat.start()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: report NOT_SERVING, leave the registry (no new sessions come), answer the
        items in flight and end the streams (the coordinator fails those sessions over),
        flush state to Redis, exit."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.health.enter_graceful_shutdown()
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        if self.drain is not None:
            self.drain.closing.set()
        grace = self.settings.drain_timeout_s if grace_s is None else grace_s
        await asyncio.gather(self.server.stop(grace), *(companion.stop(grace) for companion in self.companions))
        if self.drain is not None and self.drain.flush is not None:
            await self.drain.flush()
        if self.registry is not None:
            await self.registry.close()
        telemetry_shutdown()  # flush the last spans and metrics

    async def run_until_signal(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("%s tier draining", self.tier)
        await self.stop()
