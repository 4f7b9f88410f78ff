"""Turn export on from the standard OTEL_* environment, once per process.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or a per-signal `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT`)
or a Prometheus scrape port is set. While off nothing of the SDK is imported and every
hook in this package hands back the plain code path, so tracing-off costs nothing.

Honoured: `OTEL_SDK_DISABLED`, `OTEL_SERVICE_NAME` (default `specdec-<tier>`),
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_{TRACES,METRICS}_EXPORTER=none`,
`OTEL_EXPORTER_OTLP_*` (headers, timeout, insecure, certificates), `OTEL_BSP_*`,
`OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_METRICS_EXEMPLAR_FILTER`. Export is OTLP over gRPC.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from specdec.telemetry.instruments import COUNTER, GAUGE, HISTOGRAM, INSTRUMENTS, OBSERVED_COUNTER, UPDOWN

log = logging.getLogger(__name__)


@dataclass
class State:
    tracing: bool = False  # spans are recorded and exported
    metrics: bool = False  # instruments are live
    service_name: str = ""
    tracer: Any = None
    instruments: dict[str, Any] = field(default_factory=dict)
    providers: list[Any] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.tracing or self.metrics


STATE = State()


def _signal_on(env: Mapping[str, str], signal: str) -> bool:
    if env.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure(
    tier: str,
    metrics_port: int = 0,
    metrics_host: str = "127.0.0.1",
    environ: Mapping[str, str] | None = None,
    instance: str = "",
    prometheus: bool = False,
) -> State:
    """Install tracer and meter providers for this process's tier when the environment asks
    for export; otherwise leave everything off. Idempotent per process. `prometheus`: metrics
    on for a scrape endpoint the process serves itself (the coordinator's HTTP /metrics)."""
    env = os.environ if environ is None else environ
    if STATE.enabled or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return STATE
    traces, metrics = _signal_on(env, "TRACES"), _signal_on(env, "METRICS")
    if not (traces or metrics or metrics_port or prometheus):
        return STATE
    protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    if protocol != "grpc":
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: specdec exports OTLP over gRPC only", protocol)

    from opentelemetry.sdk.resources import Resource

    attributes = {
        "service.namespace": "specdec",
        "specdec.tier": tier,
        "service.instance.id": instance or f"{tier}-{os.getpid()}",
    }
    if not env.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = f"specdec-{tier}"
    resource = Resource.create(attributes)
    STATE.service_name = str(resource.attributes.get("service.name"))
    if traces:
        _install_tracing(resource)
    if metrics or metrics_port or prometheus:
        _install_metrics(resource, metrics, metrics_port, metrics_host, prometheus)
    if STATE.tracer is None:  # metrics only: spans are no-ops
        from opentelemetry.trace import NoOpTracer

        STATE.tracer = NoOpTracer()
    if not STATE.instruments:  # traces only: instruments on the API's no-op meter
        from opentelemetry.metrics import NoOpMeter

        STATE.instruments = create_instruments(NoOpMeter("specdec"))
    log.info(
        "telemetry on for %s: traces=%s metrics=%s prometheus_port=%s",
        STATE.service_name,
        traces,
        metrics,
        metrics_port or "-",
    )
    return STATE


def _install_tracing(resource: Any) -> None:
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    STATE.tracer = provider.get_tracer("specdec")
    STATE.providers.append(provider)
    STATE.tracing = True


def _install_metrics(resource: Any, otlp: bool, port: int, host: str, prometheus: bool = False) -> None:
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider

    readers: list[Any] = []
    if otlp:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if port or prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        readers.append(PrometheusMetricReader())  # into prometheus_client's default REGISTRY
        if port:
            start_http_server(port, addr=host)
    provider = MeterProvider(resource=resource, metric_readers=readers)
    metrics.set_meter_provider(provider)
    STATE.providers.append(provider)
    STATE.instruments = create_instruments(provider.get_meter("specdec"))
    STATE.metrics = True


def create_instruments(meter: Any) -> dict[str, Any]:
    """Synchronous instruments from the table; observable gauges are added by `observe`."""
    made: dict[str, Any] = {}
    for spec in INSTRUMENTS.values():
        if spec.kind == COUNTER:
            made[spec.name] = meter.create_counter(spec.name, spec.unit, spec.description)
        elif spec.kind == UPDOWN:
            made[spec.name] = meter.create_up_down_counter(spec.name, spec.unit, spec.description)
        elif spec.kind == HISTOGRAM:
            made[spec.name] = meter.create_histogram(
                spec.name, spec.unit, spec.description, explicit_bucket_boundaries_advisory=list(spec.buckets)
            )
    made["_meter"] = meter
    return made


def observe(name: str, read: Callable[[], Iterable[tuple[float, dict[str, str]]]]) -> None:
    """Register the observable gauge or counter `name` (from the table), read at each
    collection as (value, attributes) pairs. A no-op while metrics are off."""
    if not STATE.metrics:
        return
    from opentelemetry.metrics import Observation

    spec = INSTRUMENTS[name]
    assert spec.kind in (GAUGE, OBSERVED_COUNTER), name

    def callback(_options: Any) -> list[Any]:
        try:
            return [Observation(value, attrs) for value, attrs in read()]
        except Exception:  # a gauge must never break collection of the others
            log.debug("gauge %s failed", name, exc_info=True)
            return []

    meter = STATE.instruments["_meter"]
    create = meter.create_observable_gauge if spec.kind == GAUGE else meter.create_observable_counter
    create(name, [callback], spec.unit, spec.description)


def shutdown() -> None:
    """Flush and stop exporters (spans and a last metrics collection)."""
    for provider in STATE.providers:
        try:
            provider.shutdown()
        except Exception:
            log.debug("telemetry shutdown failed", exc_info=True)
    STATE.providers.clear()
