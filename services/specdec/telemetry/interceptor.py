"""A server span per unary and server-streaming RPC, a child of the caller's span when the
caller sends W3C trace context (`traceparent` / `tracestate`) in the gRPC metadata.

Bidirectional streams between the tiers are long-lived and carry many sessions, so they
get no span of their own: their items carry `traceparent` instead (see `tiers.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from specdec.telemetry.setup import STATE


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a tier's server should install: none while tracing is off."""
    return [TracingInterceptor()] if STATE.tracing else []


UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes would flood the traces


class TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    async def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or details.method.startswith(UNTRACED):
            return handler
        method = details.method.lstrip("/")
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _stream(handler.unary_stream, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary, method, metadata),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _start(method: str, metadata: dict[str, str]) -> Any:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    service, _, name = method.rpartition("/")
    parent = TraceContextTextMapPropagator().extract(metadata)
    return STATE.tracer.start_span(
        method,
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )


def _end(span: Any, exc: BaseException | None, context: grpc.aio.ServicerContext) -> None:
    from opentelemetry.trace import Status, StatusCode

    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
    elif exc is not None and not isinstance(exc, GeneratorExit):
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.end()


def _unary(behavior: Callable[..., Any], method: str, metadata: dict[str, str]) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        span = _start(method, metadata)
        token = otel_context.attach(trace.set_span_in_context(span))
        error: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            otel_context.detach(token)
            _end(span, error, context)

    return wrapper


def _stream(behavior: Callable[..., Any], method: str, metadata: dict[str, str]) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        span = _start(method, metadata)
        ctx = trace.set_span_in_context(span)
        responses = behavior(request, context).__aiter__()
        error: BaseException | None = None
        exhausted = False
        try:
            while True:
                token = otel_context.attach(ctx)  # current only while the handler runs, not across yields
                try:
                    response = await anext(responses)
                except StopAsyncIteration:
                    exhausted = True
                    return
                finally:
                    otel_context.detach(token)
                yield response
        except BaseException as exc:
            error = exc
            raise
        finally:
            if not exhausted and hasattr(responses, "aclose"):
                await responses.aclose()
            _end(span, error, context)

    return wrapper
