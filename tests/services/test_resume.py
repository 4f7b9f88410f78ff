"""Resuming a request from its session record, without processes: what a resumed stream
sends (no token lost or repeated, text only for the new tokens), where the continued loop
starts, how a record is checked when read back, and when the client tries again."""

from __future__ import annotations

import json
from dataclasses import asdict

import grpc
import pytest

from specdec.client import _Failover, parse_addresses
from specdec.coordinator.resume import (
    Delivery,
    fingerprint,
    finish_reason,
    merged_stats,
    released_text,
    request_from_record,
    stats_counters,
)
from specdec.core.detokenize import IncrementalDetokenizer
from specdec.core.request import RequestSpec
from specdec.core.stats import SpecStats
from specdec.state.sessions import SessionRecord, request_digest

VOCAB, CONTEXT = 1000, 64


class CharDecoder:
    """A toy tokenizer: token t is chr(ord('a') + t % 26); 99 is half of a character
    (decodes to U+FFFD until a 98 completes it, as byte-level BPE does)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, i = [], 0
        while i < len(ids):
            if ids[i] == 99:
                if i + 1 < len(ids) and ids[i + 1] == 98:
                    out.append("é")
                    i += 2
                    continue
                out.append("\ufffd")
            else:
                out.append(chr(ord("a") + ids[i] % 26))
            i += 1
        return "".join(out)


def unbroken(decoder: CharDecoder, stops: list[str], steps: list[list[int]]) -> tuple[list[int], str, list[int]]:
    """An uninterrupted stream: its tokens, its text, and the step boundaries a client can
    have stopped at (before the last chunk)."""
    detok = IncrementalDetokenizer(decoder, stops)
    ids: list[int] = []
    text, boundaries = "", []
    for i, step in enumerate(steps):
        boundaries.append(len(ids))
        ids += step
        delta = detok.add(step, final=i == len(steps) - 1)
        text += delta.text
        if delta.stopped:
            break
    return ids, text, boundaries


def resumed(
    decoder: CharDecoder, stops: list[str], steps: list[list[int]], held: int, history: int
) -> tuple[list[int], str]:
    """What a client holding `held` tokens receives from a stream continued from a record of
    `history` committed tokens, as the coordinator's Delivery sends it."""
    tokens = [t for step in steps for t in step]
    delivery = Delivery(held, lambda ids: released_text(decoder, stops, ids))
    detok = IncrementalDetokenizer(decoder, stops)
    detok.add(tokens[:history])
    sent: list[tuple[list[int], str] | None] = [delivery.add(tokens[:history], detok.text)]
    start = 0
    for i, step in enumerate(steps):
        if start >= history:
            delta = detok.add(step, final=i == len(steps) - 1)
            sent.append(delivery.add(step, delta.text))
            if delta.stopped:
                break
        start += len(step)
    return [t for out in sent if out for t in out[0]], "".join(out[1] for out in sent if out)


STEPS = [[1, 2], [3], [99, 98, 4], [5, 6, 7], [99], [98], [8, 9]]


@pytest.mark.parametrize("stops", [[], ["fgh"], ["xyz"], ["e"]])
def test_client_plus_resumed_stream_equals_the_unbroken_stream(stops):
    """For every step boundary the client may have stopped at, and every record (written at
    any step boundary, behind or ahead of the client): held + sent == the unbroken output,
    token for token and character for character."""
    decoder = CharDecoder()
    full_ids, full_text, boundaries = unbroken(decoder, stops, STEPS)
    for held in boundaries:
        held_text = released_text(decoder, stops, full_ids[:held])
        for history in boundaries:
            ids, text = resumed(decoder, stops, STEPS, held, history)
            assert full_ids[:held] + ids == full_ids, (held, history)
            assert held_text + text == full_text, (held, history)


def test_delivery_splits_a_step_the_client_got_half_of():
    """A record behind the client: the regenerated step straddles what the client holds."""
    delivery = Delivery(3, lambda ids: "".join(chr(ord("a") + t) for t in ids))
    assert delivery.add([0, 1], "ab") is None
    assert delivery.add([2, 3, 4], "cde") == ([3, 4], "de")
    assert delivery.add([5], "f") == ([5], "f")


def test_delivery_of_a_fresh_stream_passes_everything():
    delivery = Delivery(0, lambda ids: pytest.fail("no text to recompute"))
    assert delivery.add([], "") is None
    assert delivery.add([1, 2], "xy") == ([1, 2], "xy")


def record(**over) -> SessionRecord:
    base = dict(
        request_id="r1",
        fingerprint="f",
        state="running",
        prompt_ids=[5, 6, 7],
        generated_ids=[8, 9],
        max_new_tokens=6,
        sampling={"temperature": 0.7, "top_k": 0, "top_p": 0.9, "seed": 42},
        drafter="ngram",
        max_draft_tokens=3,
        adaptive=False,
        overlap=False,
        stop=[],
        stop_token_ids=[2],
        stats={
            "generated_tokens": 2,
            "steps": 1,
            "proposed_tokens": 3,
            "accepted_tokens": 1,
            "ttft_s": 0.5,
            "elapsed_s": 1.0,
        },
    )
    return SessionRecord(**{**base, **over})


def test_continued_loop_starts_where_the_record_stopped():
    """Same positions (prompt + committed tokens as context), same seed and sampling, what
    remains of max_new_tokens, the recorded stop tokens and draft settings."""
    r = record()
    request = request_from_record(r, "s2", CONTEXT)
    assert request.prompt_ids == [5, 6, 7, 8, 9]  # the next token is position 5, as it was
    assert request.max_new_tokens == 4
    assert (request.sampling.seed, request.sampling.temperature, request.sampling.top_p) == (42, 0.7, 0.9)
    assert request.stop_token_ids == frozenset({2})
    assert (str(request.drafter), request.max_draft_tokens, request.adaptive) == ("ngram", 3, False)
    assert request.max_context == CONTEXT and request.session_id == "s2"


def test_a_record_whose_output_is_complete_is_finished():
    assert finish_reason(record(), CONTEXT, text_stopped=False) is None
    assert finish_reason(record(generated_ids=[8, 9, 1, 1, 1, 1]), CONTEXT, False) == "length"
    assert finish_reason(record(generated_ids=[8, 2]), CONTEXT, False) == "stop"
    assert finish_reason(record(), CONTEXT, text_stopped=True) == "stop"
    assert finish_reason(record(prompt_ids=list(range(62))), CONTEXT, False) == "context"
    assert finish_reason(record(state="done", finish_reason="length"), CONTEXT, False) == "length"
    with pytest.raises(ValueError):
        request_from_record(record(generated_ids=[1] * 6), "s", CONTEXT)


def test_statistics_add_up_across_a_resume():
    after = SpecStats(
        prompt_tokens=5,
        generated_tokens=4,
        proposed_tokens=6,
        accepted_tokens=3,
        steps=2,
        ttft_s=0.2,
        elapsed_s=2.0,
        drafter="ngram",
    )
    merged = merged_stats(record().stats, after, prompt_tokens=3)
    assert (
        merged.prompt_tokens,
        merged.generated_tokens,
        merged.proposed_tokens,
        merged.accepted_tokens,
        merged.steps,
    ) == (3, 6, 9, 4, 3)
    assert merged.ttft_s == 0.5 and merged.elapsed_s == 3.0
    assert stats_counters(merged)["generated_tokens"] == 6


def raw(**over) -> bytes:
    data = asdict(record())
    data.update(over)
    return json.dumps(data).encode()


def test_a_record_read_back_is_checked_field_by_field():
    assert SessionRecord.from_json(raw(), VOCAB, CONTEXT) == record()
    bad = [
        b"not json",
        b"[]",
        json.dumps({"v": 1}).encode(),
        raw(v=2),
        raw(state="weird"),
        raw(prompt_ids=[]),
        raw(prompt_ids=[1, VOCAB]),
        raw(generated_ids=[-1]),
        raw(generated_ids=["1"]),
        raw(generated_ids=[True]),
        raw(max_new_tokens=1),
        raw(max_new_tokens="6"),
        raw(sampling={"temperature": 1.0}),
        raw(sampling={"temperature": "x", "top_k": 0, "top_p": 1, "seed": 1}),
        raw(prompt_ids=list(range(CONTEXT))),
        raw(stop=[1]),
        raw(state="done"),
        raw(state="done", finish_reason="bored"),
        raw(stats={"steps": "many"}),
        raw(adaptive=1),
        raw(request_id=""),
        raw(request_id="r" * 300),
        raw(stop_token_ids=[VOCAB + 1]),
    ]
    for value in bad:
        with pytest.raises((ValueError, TypeError)):
            SessionRecord.from_json(value, VOCAB, CONTEXT)


def test_a_recorded_sampling_field_out_of_range_cannot_be_continued():
    from specdec.core.errors import InvalidArgument

    for sampling in (
        {"temperature": -1.0, "top_k": 0, "top_p": 1.0, "seed": 1},
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 1 << 70},
    ):
        with pytest.raises((ValueError, InvalidArgument)):
            request_from_record(record(sampling=sampling), "s", CONTEXT)
    with pytest.raises((ValueError, InvalidArgument)):
        request_from_record(record(max_draft_tokens=99), "s", CONTEXT)


def test_the_index_names_the_request_id_and_what_it_asks_for():
    a = fingerprint(RequestSpec(prompt="hi", max_new_tokens=4, request_id="x"))
    assert a == fingerprint(RequestSpec(prompt="hi", max_new_tokens=4, request_id="y"))
    assert a != fingerprint(RequestSpec(prompt="hi", max_new_tokens=5, request_id="x"))
    assert a != fingerprint(RequestSpec(token_ids=[1], max_new_tokens=4))
    assert request_digest("x", a) != request_digest("y", a)


class Unavailable(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_client_moves_to_the_next_coordinator_and_backs_off_after_a_round():
    assert parse_addresses("a:1, b:2,") == ["a:1", "b:2"]
    failover = _Failover(["a", "b"], timeout_s=None, max_retries=None)
    assert failover.failed(0, Unavailable(), 1, None) == 0.0 and failover.current == 1
    assert failover.failed(1, Unavailable(), 2, None) == 0.0 and failover.current == 0
    assert failover.failed(0, Unavailable(), 3, None) > 0  # both tried: wait before the next round
    with pytest.raises(Unavailable):
        failover.failed(1, Unavailable(), 5, None)  # twice per coordinator, then give up
    with pytest.raises(Unavailable):
        failover.failed(0, Unavailable(grpc.StatusCode.INVALID_ARGUMENT), 1, None)


async def test_one_owner_per_lease_a_dead_ones_is_taken_over_and_a_vanished_one_retaken(redis_url):
    from specdec.state.sessions import Leases, SessionStore

    store = SessionStore(redis_url, "lease-test:")
    lost: list[str] = []
    # Renewals run when the test says (keep()), not on a timer.
    first = Leases(store, "a:1/x", lost.append, ttl_s=5, refresh_s=3600)
    second = Leases(store, "b:2/y", lambda digest: pytest.fail("b never loses it"), ttl_s=5, refresh_s=3600)
    key = store.lease_key("d")
    try:
        assert await first.take("d") is None
        assert await second.take("d") == "a:1/x"  # held: says by whom
        assert await second.take("d", dead_holder="c:3/z") == "a:1/x"  # only the holder named is replaced
        await store.redis.delete(key)  # a restarted Redis: the holder keeps it
        await first.keep()
        assert await store.redis.get(key) == b"a:1/x" and not lost
        assert await second.take("d", dead_holder="a:1/x") is None  # a found dead: taken over
        await first.keep()  # ... and a, alive after all, learns that it lost it
        assert lost == ["d"] and "d" not in first.held
        await first.release("d")  # not its own any more: nothing happens
        assert await store.redis.get(key) == b"b:2/y"
        await second.keep()
        assert await store.redis.pttl(key) > 0
        await second.release("d")
        assert await store.redis.get(key) is None
    finally:
        first.close()
        second.close()
        await store.close()
