"""A seeded request samples the same tokens in-process and through the tiers."""

from __future__ import annotations

from specdec.client import Client


def test_sampling_fields_reach_the_tiers_as_the_caller_wrote_them():
    """0.7 is not a float32: the public and internal protos carry doubles, so the tiers
    sample with exactly the value an in-process request uses."""
    from specdec.coordinator.service import spec_from_proto
    from specdec.core.sampling import SamplingParams
    from specdec.rpc import convert
    from specdec.v1 import generation_pb2

    request = generation_pb2.GenerateRequest(
        prompt="x", decoding=generation_pb2.DecodingParams(temperature=0.7, top_p=0.9)
    )
    wire = generation_pb2.GenerateRequest.FromString(request.SerializeToString())
    spec = spec_from_proto(wire)
    assert (spec.temperature, spec.top_p) == (0.7, 0.9)
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=3)
    assert convert.sampling_from_proto(convert.sampling_to_proto(params)) == params


def test_seeded_sampling_through_the_tiers_equals_in_process(tiny_stack, tiny_models, prompt_ids):
    from specdec.core.engine import Engine
    from specdec.core.request import RequestSpec

    drafter = f"model:{tiny_models[1]}"
    params = dict(
        max_new_tokens=24,
        ignore_eos=True,
        temperature=0.7,
        top_p=0.9,
        top_k=50,
        seed=4321,
        drafter=drafter,
        adaptive=False,
    )
    engine = Engine.load(tiny_models[0], drafter)
    local = engine.complete(RequestSpec(token_ids=prompt_ids, max_draft_tokens=4, **params))
    with Client(tiny_stack.address, timeout_s=120) as client:
        remote = client.complete(token_ids=prompt_ids, k=4, **params)
    assert list(remote.token_ids) == local.token_ids
    assert remote.stats.proposed_tokens == local.stats.proposed_tokens > 0
