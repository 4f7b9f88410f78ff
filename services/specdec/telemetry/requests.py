"""Coordinator side: one span per generation, one per speculation step, request metrics.

The loop stays telemetry-free: `traced_chunks` drives the generation's chunk iterator one
step at a time with the step's span current (so the remote tiers receive it as their
parent through `traceparent`), and reads what the step did from the step record each
chunk carries (`core.loop.Step`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from specdec.telemetry.setup import STATE

if TYPE_CHECKING:
    from specdec.core.generation import Chunk, GenerationResult
    from specdec.core.loop import GenerationRequest, Step

# Step attributes, also read by tests and dashboards' trace queries.
STEP_SPAN, GENERATION_SPAN, RELEASE_SPAN = "specdec.step", "specdec.generation", "specdec.release"


def traceparent() -> str:
    """W3C `traceparent` of the current span, or "" (tracing off or nothing current)."""
    if not STATE.tracing:
        return ""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def traced_chunks(
    chunks: AsyncGenerator[Chunk, None], request: GenerationRequest, result: GenerationResult
) -> AsyncGenerator[Chunk, None]:
    """Wrap a generation's chunk stream (one chunk per step) in spans and metrics; the
    stream itself when telemetry is off."""
    if not STATE.enabled:
        return chunks
    return _traced(chunks, request, result)


async def _traced(
    chunks: AsyncGenerator[Chunk, None], request: GenerationRequest, result: GenerationResult
) -> AsyncGenerator[Chunk, None]:
    from opentelemetry import context, trace
    from opentelemetry.trace import Status, StatusCode

    tracer, m = STATE.tracer, STATE.instruments
    labels = {"drafter": str(request.drafter)}
    stats = result.stats
    gen_span = tracer.start_span(
        GENERATION_SPAN,
        attributes={
            "specdec.session_id": request.session_id,
            "specdec.drafter": str(request.drafter),
            "specdec.max_draft_tokens": request.max_draft_tokens,
            "specdec.adaptive": request.adaptive,
            "specdec.max_new_tokens": request.max_new_tokens,
            "specdec.prompt_tokens": len(request.prompt_ids),
            "specdec.temperature": request.sampling.temperature,
        },
    )
    gen_ctx = trace.set_span_in_context(gen_span)
    m["specdec_active_requests"].add(1, labels)
    start = last = time.perf_counter()
    finished = False
    try:
        while True:
            position = len(request.prompt_ids) + stats.generated_tokens
            step_start = time.perf_counter()
            span = tracer.start_span(
                STEP_SPAN, context=gen_ctx, attributes={"specdec.step": stats.steps, "specdec.position": position}
            )
            token = context.attach(trace.set_span_in_context(span, gen_ctx))
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                finished = True
                span.update_name(RELEASE_SPAN)  # the session's state is freed on the tiers
                span.end()
                return
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                span.end()
                raise
            finally:
                context.detach(token)
            step = chunk.step
            span.set_attributes(_step_attributes(step))
            span.end()
            now = time.perf_counter()
            m["specdec_step_duration_seconds"].record(now - step_start, labels, context=gen_ctx)
            m["specdec_generated_tokens"].add(len(step.tokens), labels)
            m["specdec_draft_tokens_proposed"].add(step.proposed, labels)
            m["specdec_draft_tokens_accepted"].add(step.accepted, labels)
            m["specdec_accepted_length"].record(len(step.tokens), labels)
            if chunk.token_ids:
                if last == start:
                    m["specdec_time_to_first_token_seconds"].record(now - start, labels, context=gen_ctx)
                else:
                    m["specdec_inter_token_latency_seconds"].record((now - last) / len(chunk.token_ids), labels)
                last = now
            yield chunk  # no span is current while the consumer runs
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit):
            gen_span.record_exception(exc)
            gen_span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        if not finished:
            await chunks.aclose()
        _finish(gen_span, gen_ctx, stats, result, labels, time.perf_counter() - start, finished)


def _step_attributes(step: Step) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "specdec.draft_tokens": step.proposed,
        "specdec.accepted_tokens": step.accepted,
        "specdec.committed_tokens": len(step.tokens),
        "specdec.verify.batch_size": step.batch_size,
        "specdec.draft.wait_ms": step.draft_s * 1e3,
        "specdec.verify.wait_ms": step.verify_s * 1e3,
    }
    if step.first_rejected is not None:
        attributes["specdec.first_rejected_index"] = step.first_rejected  # acceptance position
    for tier, address in (("draft", step.draft_replica), ("target", step.target_replica)):
        if address:
            attributes[f"specdec.{tier}.replica"] = address
    return attributes


def _finish(
    span: Any, ctx: Any, stats: Any, result: Any, labels: dict[str, str], elapsed_s: float, finished: bool
) -> None:
    m = STATE.instruments
    reason = result.finish_reason if finished else "cancelled"
    span.set_attributes(
        {
            "specdec.finish_reason": reason,
            "specdec.generated_tokens": stats.generated_tokens,
            "specdec.proposed_tokens": stats.proposed_tokens,
            "specdec.accepted_tokens": stats.accepted_tokens,
            "specdec.acceptance_rate": stats.acceptance_rate,
            "specdec.steps": stats.steps,
            "specdec.mean_accepted_length": stats.mean_accepted_length,
            "specdec.ttft_ms": stats.ttft_s * 1e3,
            "specdec.tokens_per_s": stats.tokens_per_s,
        }
    )
    span.end()
    m["specdec_active_requests"].add(-1, labels)
    m["specdec_requests"].add(1, {**labels, "finish_reason": reason})
    m["specdec_request_duration_seconds"].record(elapsed_s, labels, context=ctx)
    if stats.proposed_tokens:
        m["specdec_acceptance_rate"].record(stats.acceptance_rate, labels, context=ctx)
