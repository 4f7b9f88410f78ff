"""A small Python client for the public Generation API, sync and asyncio.

    with Client("127.0.0.1:50051") as client:
        for event in client.generate("Once upon a time", max_new_tokens=32):
            ...
        reply = client.complete(messages=[{"role": "user", "content": "Hi"}])

Several coordinators ("HOST:PORT,HOST:PORT", or a list): calls go to one of them, and when
a call breaks with UNAVAILABLE (its coordinator died, the connection dropped) it moves to
the next. A stream is resumed there by its request_id (one is assigned when the caller
gives none) and the number of tokens already received: the caller sees each token once,
exactly as an unbroken stream would have sent it. Complete is sent again the same way
(the coordinator continues the request from its session record).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from specdec.rpc.options import PUBLIC_MAX_MESSAGE, add_metadata, client_options, with_metadata
from specdec.rpc.tls import TlsFiles, channel_credentials
from specdec.v1 import generation_pb2, generation_pb2_grpc

DECODING = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "logit_bias",
)
CONSTRAINTS = ("json_schema", "json_object", "regex")  # structured output: one of them (a schema may be a dict)
SPECULATION = {
    "drafter": "drafter",
    "max_draft_tokens": "max_draft_tokens",
    "k": "max_draft_tokens",
    "adaptive": "adaptive",
    "overlap": "overlap",
}


def make_request(
    cls: type,
    prompt: str | None = None,
    *,
    messages: list[dict[str, str]] | None = None,
    token_ids: list[int] | None = None,
    request_id: str = "",
    **params: Any,
) -> Any:
    """A GenerateRequest or CompleteRequest from keyword parameters (None = server default)."""
    request = cls(request_id=request_id)
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.chat.messages.extend(generation_pb2.ChatMessage(**m) for m in messages)
    elif token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    for name, value in params.items():
        if value is None:
            continue
        if name in DECODING:
            target = getattr(request.decoding, name)
            if isinstance(value, dict):  # logit_bias: token id -> bias
                target.update({int(k): v for k, v in value.items()})
            elif isinstance(value, list):
                target.extend(value) if hasattr(target, "extend") else None
            else:
                setattr(request.decoding, name, value)
        elif name in SPECULATION:
            setattr(request.speculation, SPECULATION[name], value)
        elif name in CONSTRAINTS:
            setattr(request.decoding.constraint, name, json.dumps(value) if isinstance(value, dict) else value)
        else:
            raise TypeError(f"unknown parameter {name!r}")
    return request


RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE})  # the coordinator (or the way to it) is gone
BACKOFF_S = 0.2  # after every coordinator failed in a row; doubled each further round
MAX_BACKOFF_S = 2.0


def parse_addresses(address: str | Sequence[str]) -> list[str]:
    """ "a:1,b:2" or ["a:1", "b:2"] -> the addresses, in order of preference."""
    parts = address.split(",") if isinstance(address, str) else list(address)
    addresses = [a.strip() for a in parts if a.strip()]
    if not addresses:
        raise ValueError("no coordinator address given")
    return addresses


class _Failover:
    """Which coordinator a client calls, and whether a failed call is tried again."""

    def __init__(self, addresses: list[str], timeout_s: float | None, max_retries: int | None) -> None:
        self.addresses, self.timeout_s = addresses, timeout_s
        self.max_retries = 2 * len(addresses) if max_retries is None else max_retries
        self.current = 0  # calls go here until it fails

    def deadline(self) -> float | None:
        return None if self.timeout_s is None else time.monotonic() + self.timeout_s

    @staticmethod
    def remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def failed(self, index: int, exc: grpc.RpcError, failures: int, deadline: float | None) -> float:
        """After the call to `index` failed (the `failures`-th time in a row with no token
        received): the seconds to wait before the next try; raises `exc` when it is not
        worth trying again."""
        code = exc.code() if hasattr(exc, "code") else None
        if code not in RESUMABLE or failures > self.max_retries or self.remaining(deadline) == 0.0:
            raise exc
        if self.current == index:
            self.current = (index + 1) % len(self.addresses)
        rounds = (failures - 1) // len(self.addresses)  # every coordinator tried once: back off
        return 0.0 if rounds == 0 else min(BACKOFF_S * 2 ** (rounds - 1), MAX_BACKOFF_S)


def request_id_for(request: Any) -> None:
    """A request without an id gets a unique one: it names the request for resumption."""
    if not request.request_id:
        request.request_id = uuid.uuid4().hex


def _credentials(tls: TlsFiles | None) -> grpc.ChannelCredentials | None:
    return channel_credentials(tls) if tls is not None and (tls.ca or tls.enabled) else None


class _BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Adds `authorization: Bearer KEY` to every call of a sync channel (on plaintext
    channels too, where gRPC's own call credentials are refused); `add_metadata` does it
    for asyncio channels."""

    def __init__(self, key: str) -> None:
        self.metadata = _bearer(key)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(with_metadata(details, self.metadata), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(with_metadata(details, self.metadata), request)


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _sync_channel(address: str, tls: TlsFiles | None, api_key: str | None) -> grpc.Channel:
    options, creds = client_options(PUBLIC_MAX_MESSAGE), _credentials(tls)
    channel = (
        grpc.secure_channel(address, creds, options=options)
        if creds is not None
        else grpc.insecure_channel(address, options=options)
    )
    return grpc.intercept_channel(channel, _BearerKey(api_key)) if api_key else channel


def _async_channel(address: str, tls: TlsFiles | None, api_key: str | None) -> grpc.aio.Channel:
    options, creds = client_options(PUBLIC_MAX_MESSAGE), _credentials(tls)
    interceptors = add_metadata(_bearer(api_key)) if api_key else None
    if creds is not None:
        return grpc.aio.secure_channel(address, creds, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


class Client:
    def __init__(
        self,
        address: str | Sequence[str],
        timeout_s: float | None = None,
        max_retries: int | None = None,
        tls: TlsFiles | None = None,
        api_key: str | None = None,
    ) -> None:
        """`address`: one coordinator or several ("a:1,b:2"); `timeout_s` bounds a whole
        call, resumes included; `max_retries`: tries after failures in a row with no token
        received (default: twice per coordinator). `tls`: the CA to trust and, for mTLS,
        this client's certificate; `api_key`: sent as `authorization: Bearer KEY`."""
        self.addresses = parse_addresses(address)
        self.channels = [_sync_channel(a, tls, api_key) for a in self.addresses]
        self.stubs = [
            generation_pb2_grpc.GenerationServiceStub(ch)  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
            for ch in self.channels
        ]
        self.timeout_s = timeout_s
        self._failover = _Failover(self.addresses, timeout_s, max_retries)

    @property
    def channel(self) -> grpc.Channel:
        return self.channels[self._failover.current]

    @property
    def stub(self) -> generation_pb2_grpc.GenerationServiceStub:
        return self.stubs[self._failover.current]

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Iterator[generation_pb2.GenerateResponse]:
        request = make_request(generation_pb2.GenerateRequest, prompt, **kwargs)
        request_id_for(request)
        failover, deadline, failures = self._failover, self._failover.deadline(), 0
        while True:
            index = failover.current
            call = self.stubs[index].Generate(request, timeout=failover.remaining(deadline))
            try:
                for response in call:
                    if response.HasField("chunk") and response.chunk.token_ids:
                        request.resume_from += len(response.chunk.token_ids)
                        failures = 0
                    yield response
                return
            except grpc.RpcError as exc:
                failures += 1
                time.sleep(failover.failed(index, exc, failures, deadline))
            finally:
                call.cancel()

    def complete(self, prompt: str | None = None, **kwargs: Any) -> generation_pb2.CompleteResponse:
        request = make_request(generation_pb2.CompleteRequest, prompt, **kwargs)
        request_id_for(request)
        failover, deadline, failures = self._failover, self._failover.deadline(), 0
        while True:
            index = failover.current
            try:
                reply: generation_pb2.CompleteResponse = self.stubs[index].Complete(
                    request, timeout=failover.remaining(deadline)
                )
                return reply
            except grpc.RpcError as exc:
                failures += 1
                time.sleep(failover.failed(index, exc, failures, deadline))

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    def __init__(
        self,
        address: str | Sequence[str],
        timeout_s: float | None = None,
        max_retries: int | None = None,
        tls: TlsFiles | None = None,
        api_key: str | None = None,
    ) -> None:
        """As `Client`, on asyncio."""
        self.addresses = parse_addresses(address)
        self.channels = [_async_channel(a, tls, api_key) for a in self.addresses]
        self.stubs = [
            generation_pb2_grpc.GenerationServiceStub(ch)  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
            for ch in self.channels
        ]
        self.timeout_s = timeout_s
        self._failover = _Failover(self.addresses, timeout_s, max_retries)

    @property
    def channel(self) -> grpc.aio.Channel:
        return self.channels[self._failover.current]

    @property
    def stub(self) -> generation_pb2_grpc.GenerationServiceStub:
        return self.stubs[self._failover.current]

    async def generate(
        self, prompt: str | None = None, **kwargs: Any
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        request = make_request(generation_pb2.GenerateRequest, prompt, **kwargs)
        request_id_for(request)
        failover, deadline, failures = self._failover, self._failover.deadline(), 0
        while True:
            index = failover.current
            call = self.stubs[index].Generate(request, timeout=failover.remaining(deadline))
            try:
                async for response in call:
                    if response.HasField("chunk") and response.chunk.token_ids:
                        request.resume_from += len(response.chunk.token_ids)
                        failures = 0
                    yield response
                return
            except grpc.RpcError as exc:
                failures += 1
                await asyncio.sleep(failover.failed(index, exc, failures, deadline))
            finally:
                call.cancel()

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> generation_pb2.CompleteResponse:
        request = make_request(generation_pb2.CompleteRequest, prompt, **kwargs)
        request_id_for(request)
        failover, deadline, failures = self._failover, self._failover.deadline(), 0
        while True:
            index = failover.current
            try:
                reply: generation_pb2.CompleteResponse = await self.stubs[index].Complete(
                    request, timeout=failover.remaining(deadline)
                )
                return reply
            except grpc.RpcError as exc:
                failures += 1
                await asyncio.sleep(failover.failed(index, exc, failures, deadline))

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
