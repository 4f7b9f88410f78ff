"""Sizes are capped before any work: every limit answers INVALID_ARGUMENT naming the field
(or, for a message over the port's cap, gRPC's own RESOURCE_EXHAUSTED), and a large
prompt being tokenized keeps no other caller waiting."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.client import AsyncClient, Client
from specdec.v1 import generation_pb2, generation_pb2_grpc

TINY_CONTEXT = 512  # tests/llama_dirs.py
LONGEST_TOKEN = 81  # characters, SmolLM2's vocabulary
HI = {"role": "user", "content": "hi"}
LIMITS = [
    ("request_id", {"request_id": "r" * 257}),
    ("decoding.stop", {"stop": ["a"] * 17}),
    ("decoding.stop", {"stop": ["x" * 257]}),
    ("chat.messages", {"prompt": None, "messages": [HI] * 257}),
    ("prompt", {"prompt": "x" * (TINY_CONTEXT * LONGEST_TOKEN + 1)}),
    (
        "chat.messages",
        {"prompt": None, "messages": [{"role": "user", "content": "x" * TINY_CONTEXT * LONGEST_TOKEN}, HI]},
    ),
]


@pytest.mark.parametrize("field,override", LIMITS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(LIMITS)])
def test_each_limit_is_invalid_argument_naming_the_field(tiny_stack, field, override):
    params = {"prompt": "hello", "max_new_tokens": 2, **override}
    prompt = params.pop("prompt")
    with Client(tiny_stack.address, timeout_s=30) as client, pytest.raises(grpc.RpcError) as err:
        client.complete(prompt, **params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(field) and len(err.value.details()) < 300  # no echo of the input


async def _health_latencies(address: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            started = time.perf_counter()
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
    return latencies


async def test_large_requests_keep_nobody_waiting(tiny_stack):
    """A 10 MB message is refused by the port's cap; prompts just under the character cap
    are tokenized off the event loop while the health check keeps answering."""
    options = [("grpc.max_send_message_length", 32 << 20)]
    stop = asyncio.Event()
    health = asyncio.create_task(_health_latencies(tiny_stack.address, stop))
    async with grpc.aio.insecure_channel(tiny_stack.address, options=options) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Complete(generation_pb2.CompleteRequest(prompt="x" * (10 << 20)), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    near_cap = "hello world " * (TINY_CONTEXT * LONGEST_TOKEN // 12)  # fits the cap, not the context
    async with AsyncClient(tiny_stack.address, timeout_s=60) as client:
        outcomes = await asyncio.gather(
            *(client.complete(near_cap, max_new_tokens=2) for _ in range(8)), return_exceptions=True
        )
    stop.set()
    latencies = await health
    assert all(
        isinstance(o, grpc.aio.AioRpcError)
        and o.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "does not fit" in o.details()
        for o in outcomes
    ), outcomes
    assert len(latencies) > 5 and max(latencies) < 0.25, sorted(latencies)[-3:]


@pytest.mark.parametrize(
    "override",
    [
        {"drafter": "d" * 5000},
        {"drafter": "model:" + "m" * 5000},
        {"prompt": None, "messages": [{"role": "r" * 5000, "content": "hi"}]},
    ],
)
def test_errors_never_echo_unbounded_input(tiny_stack, override):
    params = {"prompt": "hello", "max_new_tokens": 2, **override}
    prompt = params.pop("prompt")
    with Client(tiny_stack.address, timeout_s=30) as client, pytest.raises(grpc.RpcError) as err:
        client.complete(prompt, **params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.value.details()) < 400
