"""A bad item fails alone: the tier answers it with INVALID_ARGUMENT naming the field,
and every other item of its stream and batch is verified as if it had not been there."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import numpy as np
import pytest

from specdec.client import AsyncClient
from specdec.rpc.streams import Dial
from specdec.v1 import sampling_pb2, target_pb2, target_pb2_grpc
from tests.services.conftest import ngram_stream

VOCAB = 49152  # the tiny models share SmolLM2's tokenizer
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _target(tiny_stack) -> str:
    return next(c.address for c in tiny_stack.stack.children if c.name.startswith("target-"))


def _token(tiny_stack) -> str:
    return tiny_stack.stack.env["SPECDEC_INTERNAL_TOKEN"]


def _f16(rows: np.ndarray) -> bytes:
    return rows.astype("<f2").tobytes()


def _poisoned(prompt_ids: list[int]) -> dict[str, target_pb2.VerifyItem]:
    """Bad items, each named by the field the tier must name back."""
    sampled = sampling_pb2.SamplingParams(temperature=1.0, top_p=1.0, seed=7)
    uniform = np.full((5, VOCAB), 1.0 / VOCAB)

    def item(**fields) -> target_pb2.VerifyItem:
        base = dict(session_id=uuid.uuid4().hex, tokens=prompt_ids, sampling=sampled)
        return target_pb2.VerifyItem(**{**base, **fields})

    return {
        "tokens": item(tokens=[*prompt_ids, 10**8]),
        "draft_tokens": item(draft_tokens=[1, VOCAB + 5]),
        "draft_probs_f16": item(
            draft_tokens=[9999, 8888, 7777, 6666, 5555], draft_probs_f16=_f16(np.full((5, VOCAB), np.nan))
        ),
        "draft_probs_f16 ": item(draft_tokens=[9999, 8888], draft_probs_f16=_f16(np.zeros((2, VOCAB)))),
        "draft_probs_f16  ": item(draft_tokens=[1, 2], draft_probs_f16=_f16(uniform[:2, :100])),
        "sampling.top_p": item(sampling=sampling_pb2.SamplingParams(temperature=1.0, top_p=0.0)),
        "sampling.temperature": item(sampling=sampling_pb2.SamplingParams(temperature=float("nan"), top_p=1.0)),
        "prefix_len": item(prefix_len=-3),
        "tokens ": item(tokens=[]),
        "draft_parents": item(draft_tokens=[1, 2, 3], draft_parents=[-1, 0, 5]),
    }


async def _verify(address: str, items: list[target_pb2.VerifyItem], token: str) -> dict[int, target_pb2.VerifyResult]:
    """Send the items in one message (so they meet in one batch), as the stack's coordinator
    (its internal token), and collect every answer."""
    for tag, item in enumerate(items):
        item.tag = tag
    done = asyncio.Event()

    async def requests():
        yield target_pb2.VerifyRequest(items=items)
        await done.wait()  # keep the stream open until every answer is in

    async with Dial(token=token).channel(address) as channel:
        answers: dict[int, target_pb2.VerifyResult] = {}
        async for response in target_pb2_grpc.TargetServiceStub(channel).Verify(requests()):
            answers.update({r.tag: r for r in response.results})
            if len(answers) == len(items):
                done.set()
                break
    return answers


async def test_bad_items_fail_alone_with_the_field_named(tiny_stack, prompt_ids, reference):
    poisoned = _poisoned(prompt_ids)
    good = target_pb2.VerifyItem(
        session_id=uuid.uuid4().hex, tokens=prompt_ids, sampling=sampling_pb2.SamplingParams(top_p=1.0)
    )
    answers = await asyncio.wait_for(_verify(_target(tiny_stack), [good, *poisoned.values()], _token(tiny_stack)), 60)
    assert not answers[0].HasField("error") and list(answers[0].tokens) == reference[:1]
    for tag, field in enumerate(poisoned, start=1):
        error = answers[tag].error
        assert error.code == INVALID_ARGUMENT and error.field == field.strip(), (field, error)
        assert not answers[tag].tokens  # nothing of a bad item was committed


async def test_a_token_tree_is_verified_by_the_target_tier(tiny_stack, prompt_ids, reference):
    """A tree over gRPC: the reference path is the second root's, so the tier must walk
    past a sibling and keep the moved rows (the next step continues from them)."""
    greedy = sampling_pb2.SamplingParams(top_p=1.0)
    session = uuid.uuid4().hex
    wrong = (reference[0] + 1) % VOCAB
    tree = target_pb2.VerifyItem(
        session_id=session,
        tokens=prompt_ids,
        sampling=greedy,
        draft_tokens=[wrong, reference[0], reference[1]],
        draft_parents=[-1, -1, 1],
    )
    address, token = _target(tiny_stack), _token(tiny_stack)
    answer = (await asyncio.wait_for(_verify(address, [tree], token), 60))[0]
    assert not answer.HasField("error") and answer.num_accepted == 2 and list(answer.tokens) == reference[:3]
    step = target_pb2.VerifyItem(session_id=session, prefix_len=len(prompt_ids) + 3, sampling=greedy)
    answer = (await asyncio.wait_for(_verify(address, [step], token), 60))[0]
    assert list(answer.tokens) == reference[3:4]


async def test_a_poisoned_item_beside_eight_streams_changes_none_of_them(tiny_stack, prompt_ids, reference):
    async def poison() -> None:
        for _ in range(5):
            answers = await _verify(_target(tiny_stack), list(_poisoned(prompt_ids).values()), _token(tiny_stack))
            assert all(a.error.code == INVALID_ARGUMENT for a in answers.values())

    async with AsyncClient(tiny_stack.address, timeout_s=120) as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(ngram_stream(client, prompt_ids) for _ in range(8)), poison()), 120
        )
    assert all(ids == reference for ids, _ in results[:8])


def test_a_tier_invalid_argument_is_raised_again_as_one() -> None:
    """What only a tier can check comes back typed: the coordinator raises InvalidArgument
    (the client gets INVALID_ARGUMENT naming the field), anything else stays internal."""
    from specdec.core.errors import InvalidArgument
    from specdec.rpc.errors import item_error, raise_item_error

    with pytest.raises(InvalidArgument) as err:
        raise_item_error(item_error(InvalidArgument("draft_tokens", "token id 7 outside")), "target replica x")
    assert err.value.field == "draft_tokens" and "target replica x" in str(err.value)
    with pytest.raises(RuntimeError):
        raise_item_error(item_error(KeyError("boom")), "target replica x")
