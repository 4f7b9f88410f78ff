"""Telemetry is off by default: no SDK, and every hook hands back the plain code path."""

from __future__ import annotations

import subprocess
import sys

from specdec.launcher import tier_env
from specdec.telemetry import STATE, TierTelemetry, configure, server_interceptors, traced_chunks, traceparent


def test_off_without_otel_environment():
    state = configure("coordinator", environ={"OTEL_SERVICE_NAME": "x"})
    assert not state.enabled and state.tracer is None
    assert server_interceptors() == [] and traceparent() == ""

    async def chunks():
        yield 1

    stream = chunks()
    assert traced_chunks(stream, None, None) is stream

    def run(items):
        return items

    assert TierTelemetry("target", "verify").wrap_batch(run) is run


def test_exporters_none_or_sdk_disabled_stay_off():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}
    assert not configure("target", environ={**env, "OTEL_SDK_DISABLED": "true"}).enabled
    assert not configure(
        "target", environ={**env, "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
    ).enabled


def test_serving_process_installs_no_provider_or_exporter_when_off():
    # (redis-py imports parts of the OpenTelemetry SDK by itself; nothing gets installed)
    code = (
        "import sys, specdec.coordinator.service, specdec.target.service, specdec.draft.service, specdec.telemetry;"
        "from opentelemetry import trace, metrics;"
        "print(any(m.startswith('opentelemetry.exporter') for m in sys.modules)"
        " or type(trace.get_tracer_provider()).__name__ != 'ProxyTracerProvider'"
        " or type(metrics.get_meter_provider()).__name__ != '_ProxyMeterProvider')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_launcher_gives_each_tier_its_service_name_and_scrape_port():
    env = {"OTEL_SERVICE_NAME": "shop", "SPECDEC_METRICS_PORT": "9100"}
    assert tier_env(env, "target", 2) == {"OTEL_SERVICE_NAME": "shop-target", "SPECDEC_METRICS_PORT": "9102"}
    assert tier_env({}, "draft", 1) == {}
    assert not STATE.enabled
