"""Domain exception -> gRPC status, in one place: for every servicer method, and for one
failed item of a tier's stream (`ItemError`), which the coordinator raises again as the
same domain exception so the status survives the hop."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from specdec.core.errors import InvalidArgument, Overloaded, TierUnavailable
from specdec.v1 import errors_pb2

MAX_MESSAGE = 500  # characters of an error message that travel; input is never echoed whole

log = logging.getLogger(__name__)


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, TierUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    log.exception("internal error")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a unary or server-streaming aio servicer method with status mapping."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(
            self: object, request: object, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:
                await context.abort(*_status_for(exc))

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: object, request: object, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort(*_status_for(exc))

    return unary_wrapper


def item_error(exc: Exception) -> errors_pb2.ItemError:
    """A tier's answer for an item that failed: its status code, field and message."""
    if isinstance(exc, InvalidArgument):
        return errors_pb2.ItemError(
            code=grpc.StatusCode.INVALID_ARGUMENT.value[0], field=exc.field, message=str(exc)[:MAX_MESSAGE]
        )
    return errors_pb2.ItemError(
        code=grpc.StatusCode.INTERNAL.value[0], message=f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE]
    )


def raise_item_error(error: errors_pb2.ItemError, where: str) -> NoReturn:
    """The coordinator's side: a tier's INVALID_ARGUMENT stays one for the client."""
    if error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]:
        message = error.message.removeprefix(f"{error.field}: ")
        raise InvalidArgument(error.field or "item", f"{message} ({where})"[:MAX_MESSAGE])
    raise RuntimeError(f"{where}: {error.message}"[:MAX_MESSAGE])
