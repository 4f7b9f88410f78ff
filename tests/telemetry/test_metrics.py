"""Exported metrics agree with the response statistics; names match what Prometheus shows."""

from __future__ import annotations

import pytest

from specdec.client import Client
from specdec.telemetry import instruments

PROMPT = "The cat sat on the mat. The dog sat on the log. The cat sat on the"
COORDINATOR, TARGET, DRAFT = "specdec-coordinator", "specdec-target", "specdec-draft"


def _one(points: list, what: str):
    """The one data point of `what`: an assertion (looked at again) until its export is in."""
    assert len(points) == 1, f"{len(points)} data points of {what}"
    return points[0]


def _sum(receiver, service: str, name: str, **labels) -> float:
    points = [
        p for attrs, p in receiver.metric_points(service, name) if all(attrs.get(k) == v for k, v in labels.items())
    ]
    assert points, f"{service} exported no {name}{labels or ''}"
    return sum(p.as_int if p.WhichOneof("value") == "as_int" else p.as_double for p in points)


def test_counters_and_acceptance_agree_with_the_response(traced_stack, otlp_receiver):
    with Client(traced_stack.coordinator, timeout_s=120) as client:  # ngram: a drafter label of its own
        replies = [client.complete(PROMPT, max_new_tokens=20, ignore_eos=True, drafter="ngram", k=3)]
        events = list(client.generate(PROMPT, max_new_tokens=20, ignore_eos=True, drafter="ngram", k=3))
        replies.append(events[-1].done)  # the streaming RPC through the tracing interceptor too
    generated = sum(r.stats.generated_tokens for r in replies)
    proposed = sum(r.stats.proposed_tokens for r in replies)
    accepted = sum(r.stats.accepted_tokens for r in replies)
    assert generated == 40 and proposed > 0

    def check() -> None:
        r = otlp_receiver
        assert _sum(r, COORDINATOR, "specdec_generated_tokens", drafter="ngram") == generated
        assert _sum(r, COORDINATOR, "specdec_draft_tokens_proposed", drafter="ngram") == proposed
        assert _sum(r, COORDINATOR, "specdec_draft_tokens_accepted", drafter="ngram") == accepted
        assert _sum(r, COORDINATOR, "specdec_requests", drafter="ngram", finish_reason="length") == 2
        rate = _one(
            [p for a, p in r.metric_points(COORDINATOR, "specdec_acceptance_rate") if a["drafter"] == "ngram"],
            "specdec_acceptance_rate",
        )
        assert rate.count == 2
        assert rate.sum == pytest.approx(sum(x.stats.acceptance_rate for x in replies), rel=1e-6)
        length = _one(
            [p for a, p in r.metric_points(COORDINATOR, "specdec_accepted_length") if a["drafter"] == "ngram"],
            "specdec_accepted_length",
        )
        assert length.count == sum(x.stats.steps for x in replies) and length.sum == generated
        ttft = _one(
            [
                p
                for a, p in r.metric_points(COORDINATOR, "specdec_time_to_first_token_seconds")
                if a["drafter"] == "ngram"
            ],
            "specdec_time_to_first_token_seconds",
        )
        assert ttft.count == 2
        replicas = {
            a["tier"]: _sum(r, COORDINATOR, "specdec_replicas", tier=a["tier"])
            for a, _ in r.metric_points(COORDINATOR, "specdec_replicas")
        }
        assert replicas == {"draft": 1, "target": 1}
        for service, tier in ((TARGET, "target"), (DRAFT, "draft")):
            batches = _one(
                [p for a, p in r.metric_points(service, "specdec_batch_size") if a["tier"] == tier],
                f"{service} specdec_batch_size",
            )
            assert batches.count > 0
            assert r.metric_points(service, "specdec_queue_depth")
            assert r.metric_points(service, "specdec_tier_latency_seconds")
        assert _sum(r, TARGET, "specdec_verified_draft_tokens") >= proposed
        kv = {a["result"] for a, _ in r.metric_points(TARGET, "specdec_kv_chunks")}
        assert kv == {"hit", "miss", "rejected", "stored", "dropped"}
        assert _sum(r, TARGET, "specdec_kv_chunks", result="stored") > 0  # 8-token chunks of the prompts

    otlp_receiver.check_until_passes(check)  # looked at again as each export arrives


def test_prometheus_exposition_uses_the_documented_names():
    """Record every instrument through the real Prometheus reader: the series it exposes are
    exactly `prometheus_names()` (what the dashboards are checked against)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.metrics import Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    from specdec.telemetry.setup import create_instruments

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    meter = provider.get_meter("specdec")
    made = create_instruments(meter)
    for spec in instruments.INSTRUMENTS.values():
        labels = dict.fromkeys(spec.labels, "x")
        if spec.kind in (instruments.GAUGE, instruments.OBSERVED_COUNTER):
            create = (
                meter.create_observable_gauge if spec.kind == instruments.GAUGE else meter.create_observable_counter
            )
            create(spec.name, [lambda _o, labels=labels: [Observation(1, labels)]], spec.unit, spec.description)
        elif spec.kind == instruments.HISTOGRAM:
            made[spec.name].record(1, labels)
        else:
            made[spec.name].add(1, labels)
    text = generate_latest(registry).decode()
    provider.shutdown()
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("specdec_")}
    assert exposed == instruments.prometheus_names()
