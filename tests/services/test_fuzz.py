"""Seeded random requests built from the message descriptors, against the live stack: no
request may get INTERNAL or UNKNOWN, none may crash a tier, and a normal request still
works afterwards. Public API (Generate, Complete) and the target tier's Verify stream."""

from __future__ import annotations

import asyncio
import collections
import random
import uuid

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from specdec.client import Client
from specdec.rpc.streams import Dial
from specdec.v1 import generation_pb2, generation_pb2_grpc, target_pb2, target_pb2_grpc

PUBLIC_REQUESTS = 1000
VERIFY_ITEMS = 500
INTS = [0, 1, -1, 2, 3, 7, 16, 64, 511, 512, 49151, 49152, 2**31 - 1, -(2**31)]
FLOATS = [0.0, 1.0, 0.5, 0.7, -1.0, 1e-9, 2.0, 100.0, 1e9, float("nan"), float("inf"), -float("inf")]
STRINGS = [
    "",
    " ",
    "hello",
    "ngram",
    "none",
    "model:",
    "model:x",
    "user",
    "system",
    "wizard",
    "\x00",
    "é" * 40,
    "x" * 300,
]
T = FieldDescriptor


def _scalar(rng: random.Random, field: FieldDescriptor) -> object:
    if field.type == T.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type in (T.TYPE_FLOAT, T.TYPE_DOUBLE):
        return rng.choice(FLOATS) if rng.random() < 0.7 else rng.uniform(-2, 3)
    if field.type in (T.TYPE_STRING,):
        return rng.choice(STRINGS) if rng.random() < 0.8 else "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(20))
    if field.type == T.TYPE_BYTES:
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 7, 64])))
    if field.type == T.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values])
    value = rng.choice(INTS) if rng.random() < 0.6 else rng.randrange(-100, 600)
    if field.type in (T.TYPE_UINT32, T.TYPE_UINT64, T.TYPE_FIXED32, T.TYPE_FIXED64):
        return abs(value) % (2**32)
    return value


def fill(rng: random.Random, message: Message, depth: int = 0) -> Message:
    """Set a random subset of `message`'s fields (one member per oneof) to random values."""
    chosen = {o.name: rng.choice(o.fields) for o in message.DESCRIPTOR.oneofs}
    for field in message.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if (oneof is not None and chosen[oneof.name] is not field) or rng.random() < 0.3:
            continue
        if field.type == T.TYPE_MESSAGE:
            if depth > 3:
                continue
            if field.message_type.GetOptions().map_entry:  # a map (logit_bias): random keys and values
                key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                entries = getattr(message, field.name)
                for _ in range(rng.choice([0, 1, 3])):
                    entries[_scalar(rng, key)] = _scalar(rng, value)
            elif field.is_repeated:
                for _ in range(rng.choice([0, 1, 2, 5])):
                    fill(rng, getattr(message, field.name).add(), depth + 1)
            else:
                fill(rng, getattr(message, field.name), depth + 1)
        elif field.is_repeated:
            getattr(message, field.name).extend(_scalar(rng, field) for _ in range(rng.choice([0, 1, 3, 20])))
        else:
            setattr(message, field.name, _scalar(rng, field))
    return message


def _public(rng: random.Random) -> Message:
    request = fill(rng, rng.choice([generation_pb2.GenerateRequest, generation_pb2.CompleteRequest])())
    if request.decoding.HasField("max_new_tokens") and rng.random() < 0.9:
        request.decoding.max_new_tokens = rng.randrange(-2, 12)  # keep valid runs short
    return request


async def _call(stub: generation_pb2_grpc.GenerationServiceStub, request: Message) -> grpc.StatusCode:
    try:
        if isinstance(request, generation_pb2.GenerateRequest):
            async for _ in stub.Generate(request, timeout=20):
                pass
        else:
            await stub.Complete(request, timeout=20)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_random_public_requests_never_get_internal(tiny_stack):
    rng = random.Random(20261130)
    requests = [_public(rng) for _ in range(PUBLIC_REQUESTS)]
    codes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(tiny_stack.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        limit = asyncio.Semaphore(16)

        async def one(request: Message) -> None:
            async with limit:
                codes[(await _call(stub, request)).name] += 1

        await asyncio.gather(*(one(r) for r in requests))
    print(f"\n[fuzz public] {dict(codes)}")
    assert sum(codes.values()) == PUBLIC_REQUESTS
    assert not codes["INTERNAL"] and not codes["UNKNOWN"] and not codes["UNAVAILABLE"], codes
    assert codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > 0  # both paths were exercised
    with Client(tiny_stack.address, timeout_s=60) as client:
        assert client.complete("hello there", max_new_tokens=4).stats.generated_tokens == 4


async def test_random_verify_items_never_get_internal(tiny_stack, prompt_ids):
    from specdec.benchmarks.soak import rss_mb

    rng = random.Random(7)
    child = next(c for c in tiny_stack.stack.children if c.name.startswith("target-"))
    target, rss_before = child.address, rss_mb(child.proc.pid)
    items = []
    for tag in range(VERIFY_ITEMS):
        item = fill(rng, target_pb2.VerifyItem())
        item.tag = tag + 1
        item.session_id = uuid.uuid4().hex if rng.random() < 0.8 else "shared"
        if rng.random() < 0.5:  # also items that get past the first checks
            item.ClearField("tokens")
            item.tokens.extend(prompt_ids[: rng.randrange(1, len(prompt_ids))])
            item.prefix_len = 0
            penalties = ("min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "prompt_len")
            for name in (*penalties, "logit_bias", "min_tokens", "min_tokens_ids"):
                if rng.random() < 0.8:  # random values of these are nearly always out of range
                    item.sampling.ClearField(name)
            if rng.random() < 0.9:  # nor is a random grammar or random probability bytes valid
                item.sampling.ClearField("constraint")
            if rng.random() < 0.7:
                item.ClearField("draft_probs_f16")
            if rng.random() < 0.9:  # random parents are hardly ever a tree
                item.ClearField("draft_parents")
            if rng.random() < 0.2:  # and some carry no random field at all past the tokens
                for name in ("sampling", "draft_tokens", "draft_probs_f16", "draft_parents", "logprobs"):
                    item.ClearField(name)
                item.sampling.top_p = 1.0  # proto3's 0 would be out of range
        items.append(item)
    answers: dict[int, target_pb2.VerifyResult] = {}
    done = asyncio.Event()

    async def requests():
        for start in range(0, len(items), 25):
            yield target_pb2.VerifyRequest(items=items[start : start + 25])
        await done.wait()

    async with Dial(token=tiny_stack.stack.env["SPECDEC_INTERNAL_TOKEN"]).channel(target) as channel:
        async for response in target_pb2_grpc.TargetServiceStub(channel).Verify(requests(), timeout=120):
            answers.update({r.tag: r for r in response.results})
            if len(answers) == len(items):
                done.set()
                break
    codes = collections.Counter(a.error.code if a.HasField("error") else 0 for a in answers.values())
    print(f"\n[fuzz verify] by code: {dict(codes)}")
    assert len(answers) == VERIFY_ITEMS
    assert set(codes) <= {0, grpc.StatusCode.INVALID_ARGUMENT.value[0]}, codes
    assert codes[0] > 0 and codes[grpc.StatusCode.INVALID_ARGUMENT.value[0]] > 0
    # Failed items allocate nothing that stays (once they grew the target by gigabytes).
    rss_after = rss_mb(child.proc.pid)
    print(f"[fuzz verify] target RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    assert rss_after < rss_before * 1.10 + 50
