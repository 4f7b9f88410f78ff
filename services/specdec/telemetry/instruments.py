"""Every metric the services export, in one table, and the names Prometheus shows them by.

Names follow Prometheus conventions already (snake case, unit suffix in the name), so an
OTLP -> collector -> Prometheus pipeline and the optional scrape endpoint expose the same
series: counters gain `_total`, histograms `_bucket` / `_sum` / `_count`. The dashboards
in helm/specdec/files/ may reference only `prometheus_names()` (a test checks).
"""

from __future__ import annotations

from dataclasses import dataclass

COUNTER, UPDOWN, HISTOGRAM, GAUGE = "counter", "updown_counter", "histogram", "observable_gauge"
OBSERVED_COUNTER = "observable_counter"  # a monotonic total read from a stats object

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKENS = tuple(float(n) for n in range(1, 18))  # accepted drafts + 1, k <= 16
BATCH = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
RATIO = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class Instrument:
    name: str  # OpenTelemetry instrument name (already Prometheus-shaped)
    kind: str  # COUNTER | UPDOWN | HISTOGRAM | GAUGE | OBSERVED_COUNTER
    unit: str  # UCUM; "s" for seconds, "{thing}" annotations for counts
    description: str
    labels: tuple[str, ...]  # attribute keys recorded with every point
    buckets: tuple[float, ...] = ()  # explicit histogram boundaries


INSTRUMENTS = {
    i.name: i
    for i in [
        # coordinator: per request and per speculation step
        Instrument("specdec_requests", COUNTER, "{request}", "Finished generations", ("drafter", "finish_reason")),
        Instrument("specdec_active_requests", UPDOWN, "{request}", "Generations in progress", ("drafter",)),
        Instrument("specdec_generated_tokens", COUNTER, "{token}", "Tokens generated (committed)", ("drafter",)),
        Instrument(
            "specdec_draft_tokens_proposed", COUNTER, "{token}", "Draft tokens sent to verification", ("drafter",)
        ),
        Instrument("specdec_draft_tokens_accepted", COUNTER, "{token}", "Draft tokens the target kept", ("drafter",)),
        Instrument(
            "specdec_accepted_length",
            HISTOGRAM,
            "{token}",
            "Tokens committed per speculation step (accepted drafts + the target's own)",
            ("drafter",),
            TOKENS,
        ),
        Instrument(
            "specdec_acceptance_rate", HISTOGRAM, "1", "Per-request share of draft tokens accepted", ("drafter",), RATIO
        ),
        Instrument(
            "specdec_time_to_first_token_seconds",
            HISTOGRAM,
            "s",
            "Request start to first verified token",
            ("drafter",),
            SECONDS,
        ),
        Instrument(
            "specdec_inter_token_latency_seconds",
            HISTOGRAM,
            "s",
            "Time between streamed chunks divided by the chunk's tokens",
            ("drafter",),
            SECONDS,
        ),
        Instrument(
            "specdec_request_duration_seconds", HISTOGRAM, "s", "Whole generation, end to end", ("drafter",), SECONDS
        ),
        Instrument(
            "specdec_step_duration_seconds",
            HISTOGRAM,
            "s",
            "One speculation step (draft + verify)",
            ("drafter",),
            SECONDS,
        ),
        Instrument("specdec_replicas", GAUGE, "{replica}", "Healthy replicas the coordinator routes to", ("tier",)),
        # draft and target tiers
        Instrument(
            "specdec_tier_latency_seconds",
            HISTOGRAM,
            "s",
            "Item arrival to result inside a tier (queue + batch)",
            ("tier",),
            SECONDS,
        ),
        Instrument(
            "specdec_queue_wait_seconds", HISTOGRAM, "s", "Item arrival to the start of its batch", ("tier",), SECONDS
        ),
        Instrument(
            "specdec_batch_size", HISTOGRAM, "{sequence}", "Sequences per batched forward pass", ("tier",), BATCH
        ),
        Instrument("specdec_batch_duration_seconds", HISTOGRAM, "s", "One batched forward pass", ("tier",), SECONDS),
        Instrument("specdec_queue_depth", GAUGE, "{item}", "Items waiting for a batch", ("tier",)),
        Instrument("specdec_active_sessions", GAUGE, "{session}", "Sessions holding state on this replica", ("tier",)),
        Instrument(
            "specdec_session_cache_lookups",
            COUNTER,
            "{lookup}",
            "Items whose session state the replica held (hit) or had to resync (miss)",
            ("tier", "result"),
        ),
        Instrument(
            "specdec_verified_draft_tokens",
            COUNTER,
            "{token}",
            "Draft tokens verified by this target replica",
            ("tier",),
        ),
        Instrument(
            "specdec_verified_accepted_tokens",
            COUNTER,
            "{token}",
            "Draft tokens accepted by this target replica",
            ("tier",),
        ),
        # the shared KV tier in Redis (target and draft replicas with a KV store)
        Instrument(
            "specdec_kv_chunks",
            OBSERVED_COUNTER,
            "{chunk}",
            "KV chunks by outcome: hit / miss / rejected (reads), stored / dropped (writes)",
            ("tier", "result"),
        ),
        Instrument(
            "specdec_kv_restored_tokens",
            OBSERVED_COUNTER,
            "{token}",
            "Tokens of KV cache restored from Redis instead of recomputed",
            ("tier",),
        ),
        Instrument(
            "specdec_kv_lookup_duration_seconds", HISTOGRAM, "s", "One KV read from Redis (restore)", ("tier",), SECONDS
        ),
    ]
}


def prometheus_base_name(instrument: Instrument) -> str:
    """The name a Prometheus exposition gives the instrument (before histogram suffixes)."""
    name = instrument.name
    unit = {"s": "seconds"}.get(instrument.unit, "")
    if unit and not name.endswith("_" + unit):
        name += "_" + unit
    if instrument.kind in (COUNTER, OBSERVED_COUNTER):
        name += "_total"
    return name


def prometheus_names() -> set[str]:
    """Every series name the services expose, histograms with their three suffixes."""
    names: set[str] = set()
    for instrument in INSTRUMENTS.values():
        base = prometheus_base_name(instrument)
        if instrument.kind == HISTOGRAM:
            names |= {base + "_bucket", base + "_sum", base + "_count"}
        else:
            names.add(base)
    return names
