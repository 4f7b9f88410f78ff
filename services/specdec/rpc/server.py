"""Bootstrap shared by every tier: aio server, health, reflection, registry heartbeat,
graceful SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.config import Settings
from specdec.rpc.options import INTERNAL_MAX_MESSAGE, server_options
from specdec.state.registry import Heartbeat, Registry, ReplicaInfo
from specdec.telemetry import server_interceptors, shutdown as telemetry_shutdown

log = logging.getLogger(__name__)


@dataclass
class Drain:
    """What a tier does on SIGTERM besides leaving the registry and reporting NOT_SERVING."""

    closing: asyncio.Event = field(default_factory=asyncio.Event)  # set: streams answer what they hold, then end
    flush: Callable[[], Awaitable[None]] | None = None  # once the streams ended: persist state (KV to Redis)


class TierServer:
    """One tier's gRPC server and its registry entry."""

    def __init__(self, tier: str, settings: Settings, service_names: list[str],
                 add_servicers: Callable[[grpc.aio.Server], None], load: Callable[[], dict],
                 model: str = "", drafters: list[str] | None = None, drain: Drain | None = None) -> None:
        self.tier, self.settings, self.service_names = tier, settings, service_names
        self.drain = drain
        max_message = settings.max_request_bytes if tier == "coordinator" else INTERNAL_MAX_MESSAGE
        self.server = grpc.aio.server(options=server_options(max_message), interceptors=server_interceptors())
        add_servicers(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server)
        self.port = self.server.add_insecure_port(f"{settings.host}:{settings.port_for(tier)}")
        self.address = f"{settings.advertise_host or settings.host}:{self.port}"
        self.info = ReplicaInfo(tier=tier, address=self.address, model=model, drafters=drafters or [],
                                heartbeat_s=settings.heartbeat_s)
        self.registry = Registry(settings.redis_url, settings.redis_prefix) if settings.redis_url else None
        self.heartbeat = Heartbeat(self.registry, self.info, load, settings.heartbeat_s) if self.registry else None

    async def start(self) -> None:
        await self.server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.heartbeat is not None:
            self.heartbeat.start()
        log.info("%s tier serving on %s", self.tier, self.address)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: report NOT_SERVING, leave the registry (no new sessions come), answer the
        items in flight and end the streams (the coordinator fails those sessions over),
        flush state to Redis, exit."""
        await self.health.enter_graceful_shutdown()
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        if self.drain is not None:
            self.drain.closing.set()
        await self.server.stop(self.settings.drain_timeout_s if grace_s is None else grace_s)
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
