"""Sampling controls and structured output through the three tiers (coordinator, draft,
target as real processes): the fields cross both protos intact, and the tiers produce what
the in-process engine produces, greedy and seeded, with every drafter."""

from __future__ import annotations

import asyncio

import pytest

from specdec.client import Client

PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.7, "repetition_penalty": 1.5, "min_p": 0.1}


def test_penalty_and_constraint_fields_cross_the_protos():
    from specdec.coordinator.service import spec_from_proto
    from specdec.core.sampling import SamplingParams
    from specdec.rpc import convert
    from specdec.v1 import generation_pb2

    request = generation_pb2.GenerateRequest(
        prompt="x",
        decoding=generation_pb2.DecodingParams(min_p=0.05, presence_penalty=-0.3, repetition_penalty=1.1),
    )
    request.decoding.constraint.regex = "[ab]+"
    spec = spec_from_proto(generation_pb2.GenerateRequest.FromString(request.SerializeToString()))
    assert (spec.min_p, spec.presence_penalty, spec.frequency_penalty, spec.repetition_penalty) == (
        0.05,
        -0.3,
        None,
        1.1,
    )
    assert (spec.grammar_kind, spec.grammar) == ("regex", "[ab]+")
    for params in (
        SamplingParams(temperature=0.7, min_p=0.2, frequency_penalty=0.3, prompt_len=9, grammar_kind="json_object"),
        SamplingParams(
            repetition_penalty=1.3, presence_penalty=2.0, grammar_kind="json_schema", grammar='{"type":"x"}'
        ),
        SamplingParams(),
    ):
        assert convert.sampling_from_proto(convert.sampling_to_proto(params)) == params


@pytest.fixture(scope="module")
def engine(tiny_models):
    from specdec.core.engine import Engine

    return Engine.load(tiny_models[0], f"model:{tiny_models[1]}")


def _local(engine, prompt_ids: list[int], **params):
    from specdec.core.request import RequestSpec

    k = params.pop("k", 4)
    return engine.complete(RequestSpec(token_ids=prompt_ids, max_draft_tokens=k, adaptive=False, **params))


def _remote(address: str, prompt_ids: list[int], **params):
    with Client(address, timeout_s=120) as client:
        return client.complete(token_ids=prompt_ids, adaptive=False, **params)


def test_penalties_through_the_tiers_equal_plain_decoding(tiny_stack, tiny_models, prompt_ids, engine):
    """Greedy: every drafter through the tiers gives in-process plain decoding's tokens
    (and the penalties matter); seeded sampling equals the in-process run token for token."""
    common = {"max_new_tokens": 24, "ignore_eos": True, **PENALTIES}
    plain = _local(engine, prompt_ids, drafter="none", **common).token_ids
    assert plain != _local(engine, prompt_ids, drafter="none", max_new_tokens=24, ignore_eos=True).token_ids
    for drafter in ("none", "ngram", f"model:{tiny_models[1]}"):
        remote = _remote(tiny_stack.address, prompt_ids, drafter=drafter, k=4, **common)
        assert list(remote.token_ids) == plain, drafter
    sampled = {**common, "temperature": 0.8, "top_k": 50, "seed": 99, "drafter": f"model:{tiny_models[1]}"}
    local = _local(engine, prompt_ids, **sampled)
    remote = _remote(tiny_stack.address, prompt_ids, k=4, **sampled)
    assert list(remote.token_ids) == local.token_ids
    assert remote.stats.accepted_tokens == local.stats.accepted_tokens > 0


def test_bad_penalties_are_invalid_argument_naming_the_field(tiny_stack, prompt_ids):
    import grpc

    for field, value in [("min_p", 2.0), ("presence_penalty", 9.0), ("repetition_penalty", -1.0)]:
        with pytest.raises(grpc.RpcError) as err:
            _remote(tiny_stack.address, prompt_ids, max_new_tokens=4, **{field: value})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"decoding.{field}" in err.value.details()


STRUCTURED = ["person", "items", "shape", "date", "ref"]  # of tests/structured_schemas.py


def test_structured_output_through_the_tiers_equals_plain(tiny_stack, tiny_models, prompt_ids, engine):
    """JSON schemas (and a regex) through the tiers: greedy output is in-process plain
    constrained decoding's with every drafter, sampled output equals the in-process run,
    and every output parses and validates."""
    import json

    import jsonschema

    from tests.structured_schemas import SCHEMAS

    drafters = ("none", "ngram", f"model:{tiny_models[1]}")
    for name in STRUCTURED:
        schema, source = SCHEMAS[name], json.dumps(SCHEMAS[name])
        common = {"max_new_tokens": 120, "grammar_kind": "json_schema", "grammar": source}
        plain = _local(engine, prompt_ids, drafter="none", **common)
        jsonschema.validate(json.loads(plain.text), schema)
        for drafter in drafters:
            remote = _remote(
                tiny_stack.address, prompt_ids, drafter=drafter, k=4, max_new_tokens=120, json_schema=schema
            )
            assert list(remote.token_ids) == plain.token_ids, (name, drafter)
        sampled = {"temperature": 1.0, "seed": 5, "drafter": drafters[2]}
        local = _local(engine, prompt_ids, **common, **sampled)
        remote = _remote(tiny_stack.address, prompt_ids, k=4, max_new_tokens=120, json_schema=source, **sampled)
        assert list(remote.token_ids) == local.token_ids, name
        jsonschema.validate(json.loads(remote.text), schema)
    remote = _remote(tiny_stack.address, prompt_ids, drafter="ngram", max_new_tokens=40, regex="[a-z]{2,5}-[0-9]{3}")
    assert __import__("re").fullmatch("[a-z]{2,5}-[0-9]{3}", remote.text), remote.text


def test_bad_constraint_is_invalid_argument(tiny_stack, prompt_ids):
    import grpc

    for constraint in ({"json_schema": '{"type": "nonsense"}'}, {"json_schema": "{oops"}, {"regex": "a(b"}):
        with pytest.raises(grpc.RpcError) as err:
            _remote(tiny_stack.address, prompt_ids, max_new_tokens=4, **constraint)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"decoding.constraint.{next(iter(constraint))}" in err.value.details()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_resumed_request_continues_with_its_penalties_and_constraint(engine, tiny_models, prompt_ids, temperature):
    """A coordinator that takes a broken request over continues from the record (prompt +
    committed tokens as the new context) with the resent request's penalties and
    constraint, and the original prompt's length: the continuation is the unbroken run's
    tail, the constraint replayed over the output before the break."""
    import json

    from specdec.coordinator.resume import request_from_record
    from specdec.core.generation import generate
    from specdec.core.request import RequestSpec, continued_sampling
    from specdec.state.sessions import SessionRecord
    from tests.structured_schemas import SCHEMAS

    spec = RequestSpec(
        token_ids=prompt_ids,
        max_new_tokens=60,
        temperature=temperature,
        seed=17,
        # Sampled: plain decoding, whose steps end at every token. With speculation the
        # draws depend on where steps begin, so a resume mid-step is exact in distribution.
        drafter=f"model:{tiny_models[1]}" if temperature == 0 else "none",
        max_draft_tokens=3,
        adaptive=False,
        grammar_kind="json_schema",
        grammar=json.dumps(SCHEMAS["ref"]),
        **PENALTIES,
    )
    unbroken = engine.complete(spec)
    assert len(unbroken.token_ids) > 10
    request, stops = engine_request(engine, spec)
    held = 7
    record = SessionRecord(
        request_id="r",
        fingerprint="f",
        state="running",
        prompt_ids=prompt_ids,
        generated_ids=unbroken.token_ids[:held],
        max_new_tokens=60,
        sampling={"temperature": temperature, "top_k": 0, "top_p": 1.0, "seed": 17},
        drafter=str(request.drafter),
        max_draft_tokens=3,
        adaptive=False,
        overlap=False,
        stop=stops,
        stop_token_ids=sorted(request.stop_token_ids),
    )
    continued = request_from_record(record, "resumed", engine.limits.max_context)
    continued.sampling = continued_sampling(continued.sampling, spec, len(prompt_ids))
    assert continued.sampling.prompt_len == len(prompt_ids) and continued.sampling.constrained

    async def resume():
        try:
            return await generate(continued, engine.tiers, engine.tokenizer, stops)
        finally:
            await engine.aclose()

    tail = asyncio.run(resume())
    assert unbroken.token_ids[:held] + tail.token_ids == unbroken.token_ids


def engine_request(engine, spec):
    from specdec.core.request import build_request

    return build_request(spec, engine.tokenizer, engine.limits, engine.default_drafter, engine.available_drafters)
