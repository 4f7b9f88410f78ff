"""Draft and target tier side: a span per item (child of the coordinator's step span,
whose context arrives in the item's `traceparent`), a span per batched forward pass with a
span link to every item's step, and the tier's latency/queue/batch metrics.

The micro-batcher runs batches on a worker thread and knows nothing of tracing; items are
matched to their trace context by identity while their servicer call is waiting.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from specdec.telemetry.setup import STATE, observe

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending:
    parent: Any  # SpanContext of the coordinator's step span, or None (untraced)
    arrived: float  # perf_counter at arrival
    started: float = 0.0  # perf_counter when its batch started
    finished: float = 0.0  # ... and finished
    batch_size: int = 0
    batch: Any = None  # SpanContext of the batch span


def _parent(traceparent: str) -> Any:
    if not traceparent:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": traceparent}))
    span_context = ctx.get_span_context()
    return span_context if span_context.is_valid else None


class TierTelemetry:
    """Spans and metrics of one tier's items and batches. Every hook returns the plain code
    path while telemetry is off."""

    def __init__(self, tier: str, operation: str) -> None:
        self.tier, self.operation = tier, operation  # e.g. ("target", "verify")
        self.labels = {"tier": tier}
        self._pending: dict[int, _Pending] = {}

    def instrument(self, batcher: Any, active_sessions: Callable[[], int], kv_store: Any = None) -> None:
        """Trace and measure `batcher`'s batches; export its queue depth and the sessions held;
        with a KV store (`RedisKVStore`), its reads as spans and its counters as metrics."""
        if not STATE.enabled:
            return
        batcher.wrap_batches(self.wrap_batch)
        observe("specdec_queue_depth", lambda: [(batcher.stats.queue_depth, self.labels)])
        observe("specdec_active_sessions", lambda: [(active_sessions(), self.labels)])
        if kv_store is not None and hasattr(kv_store, "stats"):
            self._instrument_kv(kv_store)

    def _instrument_kv(self, store: Any) -> None:
        stats = store.stats
        outcomes = {
            "hit": "hit_chunks",
            "miss": "missed_chunks",
            "rejected": "rejected_chunks",
            "stored": "stored_chunks",
            "dropped": "dropped_chunks",
        }
        observe(
            "specdec_kv_chunks",
            lambda: [(getattr(stats, field), {**self.labels, "result": result}) for result, field in outcomes.items()],
        )
        observe("specdec_kv_restored_tokens", lambda: [(stats.restored_tokens, self.labels)])
        store.on_lookup = self._record_lookup

    def _record_lookup(self, lookup: Any) -> None:
        """A span (child of the batch span) and a duration for each restore that read Redis."""
        STATE.instruments["specdec_kv_lookup_duration_seconds"].record(
            (lookup.end_ns - lookup.start_ns) / 1e9, self.labels
        )
        span = STATE.tracer.start_span(
            "kv.restore",
            start_time=lookup.start_ns,
            attributes={
                "specdec.tier": self.tier,
                "db.system": "redis",
                "db.operation": "MGET",
                "specdec.kv.hit_chunks": lookup.hit_chunks,
                "specdec.kv.restored_tokens": lookup.restored_tokens,
                "specdec.kv.hit": lookup.restored_tokens > 0,
            },
        )
        span.end(end_time=lookup.end_ns)

    def wrap_batch(self, run_batch: Callable[[list[Item]], list[Result]]) -> Callable[[list[Item]], list[Result]]:
        """`run_batch` recording a batch span (linked to each item's step) and batch metrics."""
        if not STATE.enabled:
            return run_batch

        def traced(items: list[Item]) -> list[Result]:
            from opentelemetry import context, trace
            from opentelemetry.context import Context
            from opentelemetry.trace import Link, Status, StatusCode

            started = time.perf_counter()
            pending = [self._pending.get(id(item)) for item in items]
            links = [
                Link(p.parent, {"specdec.session_id": getattr(item, "session_id", "")})
                for p, item in zip(pending, items)
                if p is not None and p.parent is not None
            ]
            span = None
            if links:  # a batch of untraced items is not worth a trace of its own
                span = STATE.tracer.start_span(
                    f"{self.tier}.{self.operation}_batch",
                    context=Context(),
                    links=links,
                    kind=trace.SpanKind.INTERNAL,
                    attributes={
                        "specdec.tier": self.tier,
                        "specdec.batch.size": len(items),
                        "specdec.batch.traced_items": len(links),
                    },
                )
            token = context.attach(trace.set_span_in_context(span)) if span is not None else None
            try:
                results = run_batch(items)  # KV reads inside become children of the batch span
            except BaseException as exc:
                if span is not None:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise
            finally:
                if token is not None:
                    context.detach(token)
                if span is not None:
                    span.end()
            finished = time.perf_counter()
            batch = span.get_span_context() if span is not None else None
            for p in pending:
                if p is not None:
                    p.started, p.finished, p.batch_size, p.batch = started, finished, len(items), batch
            m = STATE.instruments
            m["specdec_batch_size"].record(len(items), self.labels)
            m["specdec_batch_duration_seconds"].record(finished - started, self.labels)
            return results

        return traced

    async def handle(
        self,
        traceparent: str,
        item: Item,
        call: Callable[[Item], Awaitable[Result]],
        attributes: Callable[[Item], dict[str, Any]],
        describe: Callable[[Item, Result], dict[str, Any]],
    ) -> Result:
        """Run `call(item)` inside the item's span (a child of the step in `traceparent`);
        `attributes(item)` and `describe(item, result)` give the span's attributes."""
        if not STATE.enabled:
            return await call(item)
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        parent = _parent(traceparent)
        pending = _Pending(parent, time.perf_counter())
        span = None
        if parent is not None:
            span = STATE.tracer.start_span(
                f"{self.tier}.{self.operation}",
                context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
                kind=trace.SpanKind.SERVER,
                attributes={"specdec.tier": self.tier, **attributes(item)},
            )
        self._pending[id(item)] = pending
        try:
            result = await call(item)
        except BaseException as exc:
            if span is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                span.end()
            raise
        finally:
            self._pending.pop(id(item), None)
        done = time.perf_counter()
        described = describe(item, result)
        m = STATE.instruments
        m["specdec_tier_latency_seconds"].record(done - pending.arrived, self.labels)
        if pending.started:
            m["specdec_queue_wait_seconds"].record(pending.started - pending.arrived, self.labels)
        m["specdec_session_cache_lookups"].add(
            1, {**self.labels, "result": "miss" if described.get("specdec.needs_resync") else "hit"}
        )
        if span is not None:
            span.set_attributes(described)
            if pending.started:
                span.set_attributes(
                    {
                        "specdec.batch.size": pending.batch_size,
                        "specdec.batch.wait_ms": (pending.started - pending.arrived) * 1e3,
                        "specdec.batch.compute_ms": (pending.finished - pending.started) * 1e3,
                    }
                )
            if pending.batch is not None:
                span.add_link(pending.batch, {"specdec.link": "batch"})
            span.end()
        return result

    def count(self, name: str, value: int) -> None:
        if STATE.metrics and value:
            STATE.instruments[name].add(value, self.labels)
