"""Domain exception -> gRPC status, in one place for every servicer method."""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import grpc

from specdec.core.errors import InvalidArgument, TierUnavailable

log = logging.getLogger(__name__)


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, TierUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    log.exception("internal error")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def grpc_errors(method: Callable) -> Callable:
    """Wrap a unary or server-streaming aio servicer method with status mapping."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:
                await context.abort(*_status_for(exc))
        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort(*_status_for(exc))
    return unary_wrapper
