"""A small Python client for the public Generation API, sync and asyncio.

    with Client("127.0.0.1:50051") as client:
        for event in client.generate("Once upon a time", max_new_tokens=32):
            ...
        reply = client.complete(messages=[{"role": "user", "content": "Hi"}])
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from specdec.rpc.options import PUBLIC_MAX_MESSAGE, client_options
from specdec.v1 import generation_pb2, generation_pb2_grpc

DECODING = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "ignore_eos")
SPECULATION = {"drafter": "drafter", "max_draft_tokens": "max_draft_tokens", "k": "max_draft_tokens",
               "adaptive": "adaptive", "overlap": "overlap"}


def make_request(cls: type, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                 token_ids: list[int] | None = None, request_id: str = "", **params: Any) -> Any:
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
            if isinstance(value, list):
                target.extend(value) if hasattr(target, "extend") else None
            else:
                setattr(request.decoding, name, value)
        elif name in SPECULATION:
            setattr(request.speculation, SPECULATION[name], value)
        else:
            raise TypeError(f"unknown parameter {name!r}")
    return request


class Client:
    def __init__(self, address: str, timeout_s: float | None = None) -> None:
        self.channel = grpc.insecure_channel(address, options=client_options(PUBLIC_MAX_MESSAGE))
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
        self.timeout_s = timeout_s

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Iterator[generation_pb2.GenerateResponse]:
        request = make_request(generation_pb2.GenerateRequest, prompt, **kwargs)
        yield from self.stub.Generate(request, timeout=self.timeout_s)

    def complete(self, prompt: str | None = None, **kwargs: Any) -> generation_pb2.CompleteResponse:
        request = make_request(generation_pb2.CompleteRequest, prompt, **kwargs)
        reply: generation_pb2.CompleteResponse = self.stub.Complete(request, timeout=self.timeout_s)
        return reply

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    def __init__(self, address: str, timeout_s: float | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=client_options(PUBLIC_MAX_MESSAGE))
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
        self.timeout_s = timeout_s

    async def generate(self, prompt: str | None = None,
                       **kwargs: Any) -> AsyncIterator[generation_pb2.GenerateResponse]:
        request = make_request(generation_pb2.GenerateRequest, prompt, **kwargs)
        async for response in self.stub.Generate(request, timeout=self.timeout_s):
            yield response

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> generation_pb2.CompleteResponse:
        request = make_request(generation_pb2.CompleteRequest, prompt, **kwargs)
        reply: generation_pb2.CompleteResponse = await self.stub.Complete(request, timeout=self.timeout_s)
        return reply

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
