"""The operator's own Prometheus metrics (SPECDEC_OPERATOR_METRICS_PORT; the chart's
PodMonitor/ServiceMonitor scrapes them): what it reconciled, decided and found wrong."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

RECONCILES = Counter("specdec_operator_reconciles", "Reconcile passes, by trigger and outcome", ["trigger", "result"])
SCALING = Counter(
    "specdec_operator_scaling_decisions",
    "Replica count changes decided, per tier",
    ["namespace", "decoder", "tier", "direction"],
)
DESIRED = Gauge(
    "specdec_operator_desired_replicas", "Replicas the operator asks of each tier", ["namespace", "decoder", "tier"]
)
READY = Gauge(
    "specdec_operator_ready_replicas", "Ready replicas of each tier, as last read", ["namespace", "decoder", "tier"]
)
FAULTS = Gauge(
    "specdec_operator_faults", "Faults a decoder has now, by reason (0 = none)", ["namespace", "decoder", "reason"]
)
_started: set[int] = set()


def serve(port: int) -> None:
    """Serve /metrics on 0.0.0.0:``port`` (once per process)."""
    if port and port not in _started:
        start_http_server(port, addr="0.0.0.0")
        _started.add(port)


def forget(namespace: str, decoder: str) -> None:
    """Drop a deleted decoder's series."""
    for gauge in (DESIRED, READY, FAULTS):
        for labels in list(gauge._metrics):  # prometheus_client has no remove-by-prefix
            if labels[:2] == (namespace, decoder):
                gauge.remove(*labels)
