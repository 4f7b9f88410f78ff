"""An in-process OTLP/gRPC receiver (real TraceService + MetricsService servicers on
loopback) and a stack of real tier processes exporting to it."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import ValkeyProcess, launch

T = TypeVar("T")


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    links: list[tuple[str, str, dict[str, Any]]]  # (trace id, span id, attributes)


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Receiver:
    """Collects what the tiers export; `address` is the OTLP endpoint."""

    address: str = ""
    spans: list[Span] = field(default_factory=list)
    metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)  # notified on every export
    exports: int = 0

    def add_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self.lock:
            self.metric_requests.append(request)
            self.exports += 1
            self.lock.notify_all()

    def add_traces(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for rs in request.resource_spans:
                service = str(_attrs(rs.resource.attributes).get("service.name"))
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(
                            Span(
                                service,
                                s.name,
                                s.trace_id.hex(),
                                s.span_id.hex(),
                                s.parent_span_id.hex(),
                                s.kind,
                                _attrs(s.attributes),
                                [(ln.trace_id.hex(), ln.span_id.hex(), _attrs(ln.attributes)) for ln in s.links],
                            )
                        )
            self.exports += 1
            self.lock.notify_all()

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)

    def wait_for(self, ready: Callable[[list[Span]], bool], timeout_s: float = 20.0) -> list[Span]:
        """The spans once `ready(spans)` holds, looked at again as each export arrives."""
        with self.lock:
            if self.lock.wait_for(lambda: ready(list(self.spans)), timeout_s):
                return list(self.spans)
        raise AssertionError(f"spans not complete after {timeout_s}s: {[(s.service, s.name) for s in self.snapshot()]}")

    def check_until_passes(self, check: Callable[[], T], timeout_s: float = 15.0) -> T:
        """Run `check` (asserts on what was received) again as each export arrives until it
        passes; its last failure is raised at the deadline."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while True:
                seen = self.exports
                try:
                    return check()
                except AssertionError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    self.lock.wait_for(lambda: self.exports != seen, left)

    def metric_points(self, service: str, name: str) -> list[tuple[dict[str, Any], Any]]:
        """Data points of the newest export of `name` from `service`: (attributes, point)."""
        with self.lock:
            requests = list(self.metric_requests)
        for request in reversed(requests):
            for rm in request.resource_metrics:
                if _attrs(rm.resource.attributes).get("service.name") != service:
                    continue
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.name == name:
                            data = getattr(metric, metric.WhichOneof("data"))
                            return [(_attrs(p.attributes), p) for p in data.data_points]
        return []


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request, context):
        self.receiver.add_traces(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request, context):
        self.receiver.add_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture(scope="module")
def otlp_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(receiver), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(receiver), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    receiver.address = f"127.0.0.1:{port}"
    yield receiver
    server.stop(0)


@pytest.fixture(scope="session")
def telemetry_models(tiny_models: tuple[str, str]) -> tuple[str, str]:
    return tiny_models


@pytest.fixture(scope="module")
def traced_stack(telemetry_models: tuple[str, str], valkey: ValkeyProcess, otlp_receiver: Receiver):
    """Target, draft and coordinator as separate processes, all exporting to the receiver."""
    target, draft = telemetry_models
    prefix = f"specdec-tel-{uuid.uuid4().hex[:6]}:"
    env = {
        "SPECDEC_REDIS_PREFIX": prefix,
        "SPECDEC_TORCH_THREADS": "1",
        "SPECDEC_HEARTBEAT_S": "0.5",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{otlp_receiver.address}",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "",
        "SPECDEC_KV_CHUNK_TOKENS": "8",
    }  # small KV chunks: the prompts read and write Redis
    stack = launch(target, f"model:{draft}", 1, 1, valkey.url, env)
    try:
        yield stack
    finally:
        stack.stop()


ROOT = Path(__file__).resolve().parents[2]
