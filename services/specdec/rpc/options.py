"""gRPC channel and server options, agreed on both ends.

Keepalive: clients ping every KEEPALIVE_S even with no call in flight (a dead peer is
noticed in seconds, not at the next request), so servers must accept pings that often;
gRPC's default server minimum is 5 minutes, and a client pinging faster than that is
answered with GOAWAY `too_many_pings` — which used to look like a dead replica. Servers
also ping their clients, so a coordinator or client that vanished without closing its
streams is noticed and its sessions released.

Message sizes: the internal streams carry float16 draft probabilities (k x vocab x 2 bytes
an item), so they allow 64 MiB; the public port allows what a request needs (default 4
MiB, SPECDEC_MAX_REQUEST_BYTES). gRPC itself refuses a larger message with
RESOURCE_EXHAUSTED before any of our code (or the tokenizer) sees it.
"""

from __future__ import annotations

from typing import Any

import grpc

KEEPALIVE_S = 10.0
KEEPALIVE_TIMEOUT_S = 5.0
INTERNAL_MAX_MESSAGE = 64 << 20
PUBLIC_MAX_MESSAGE = 4 << 20

Options = list[tuple[str, int]]


def client_options(max_message: int = INTERNAL_MAX_MESSAGE, keepalive_s: float = KEEPALIVE_S) -> Options:
    return [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", INTERNAL_MAX_MESSAGE),  # replies: what a server may send
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection
    ]


def server_options(max_message: int = INTERNAL_MAX_MESSAGE, keepalive_s: float = KEEPALIVE_S) -> Options:
    return [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", INTERNAL_MAX_MESSAGE),
        # Accept the clients' pings (half their interval: timers jitter), with or without calls.
        ("grpc.http2.min_ping_interval_without_data_ms", int(keepalive_s * 1000 / 2)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Ping clients too, less often than they ping us: a vanished peer's streams end.
        ("grpc.keepalive_time_ms", int(keepalive_s * 2000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
    ]


Metadata = tuple[tuple[str, str], ...]


def with_metadata(details: Any, metadata: Metadata) -> Any:
    """A call's details with `metadata` appended (an API key, the internal token)."""
    return details._replace(metadata=(*(details.metadata or ()), *metadata))


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(with_metadata(details, self.metadata), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(with_metadata(details, self.metadata), request)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(with_metadata(details, self.metadata), requests)


def add_metadata(metadata: Metadata) -> list[Any]:
    """Interceptors that add `metadata` to every call an asyncio channel makes. One per
    kind of call: grpc.aio files an interceptor under the first kind it implements only."""
    return [_UnaryUnary(metadata), _UnaryStream(metadata), _StreamStream(metadata)]
