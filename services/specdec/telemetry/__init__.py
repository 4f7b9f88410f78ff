"""OpenTelemetry traces and metrics for the tiers, off unless the OTEL_* environment asks.

* `configure(tier, ...)` once at process start (`specdec serve` does it); `shutdown()` flushes.
* Coordinator: `server_interceptors()` (a span per public RPC, parented on the caller's W3C
  context), `traced_chunks(...)` (a span per generation and per speculation step, request
  metrics), `traceparent()` (stamped on every propose/verify item so the tiers' spans join).
* Draft/target tiers: `TierTelemetry` (a span per item, a span per batched forward pass
  linked to each item's step, latency / queue / batch metrics).
* `instruments.INSTRUMENTS` lists every metric; `instruments.prometheus_names()` their
  Prometheus series names (what the Grafana dashboards may use).

The core imports none of this; the service adapters call these hooks.
"""

from specdec.telemetry.interceptor import server_interceptors
from specdec.telemetry.requests import traced_chunks, traceparent
from specdec.telemetry.setup import STATE, configure, observe, shutdown
from specdec.telemetry.tiers import TierTelemetry

__all__ = [
    "STATE",
    "TierTelemetry",
    "configure",
    "observe",
    "server_interceptors",
    "shutdown",
    "traced_chunks",
    "traceparent",
]
