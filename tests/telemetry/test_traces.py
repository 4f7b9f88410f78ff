"""One generation through three tier processes yields one connected trace."""

from __future__ import annotations

import os

import grpc

from specdec.client import make_request
from specdec.v1 import generation_pb2, generation_pb2_grpc
from tests.telemetry.conftest import Span

PROMPT = "The cat sat on the mat. The dog sat on the log. The cat sat on the"
SERVER, INTERNAL = 2, 1  # OTLP span kinds


def _complete(address: str, metadata: tuple = (), **kwargs) -> generation_pb2.CompleteResponse:
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        return stub.Complete(
            make_request(generation_pb2.CompleteRequest, PROMPT, **kwargs), metadata=metadata, timeout=120
        )


def test_one_generation_is_one_connected_trace(traced_stack, telemetry_models, otlp_receiver):
    caller_trace, caller_span = os.urandom(16).hex(), os.urandom(8).hex()
    otlp_receiver.spans.clear()
    reply = _complete(
        traced_stack.coordinator,
        (("traceparent", f"00-{caller_trace}-{caller_span}-01"),),
        max_new_tokens=24,
        ignore_eos=True,
        drafter=f"model:{telemetry_models[1]}",
        k=4,
        adaptive=False,
    )
    stats = reply.stats
    assert stats.generated_tokens == 24 and stats.proposed_tokens > 0

    def complete(spans: list[Span]) -> bool:
        """Every process's spans of this request are in (each tier exports on its own)."""
        steps = {s.span_id for s in spans if s.name == "specdec.step"}
        linked = {sid for s in spans if s.name == "target.verify_batch" for _, sid, _ in s.links}
        count = lambda name: sum(s.name == name for s in spans)
        return (
            count("specdec.generation") > 0
            and len(steps) >= stats.steps
            and steps <= linked
            and count("target.verify") >= stats.steps
            and count("draft.propose") >= stats.steps - 1
            and count("kv.restore") > 0
        )

    spans = otlp_receiver.wait_for(complete)
    batch_traces = {s.trace_id for s in spans if s.name.endswith("_batch")}  # batches: traces of their own
    request_spans = [s for s in spans if s.trace_id not in batch_traces and not s.name.startswith("grpc.health")]

    # one trace: the caller's, across all three processes
    assert {s.trace_id for s in request_spans} == {caller_trace}
    assert {s.service for s in request_spans} >= {"specdec-coordinator", "specdec-draft", "specdec-target"}

    by_id = {s.span_id: s for s in request_spans}
    (rpc,) = [s for s in request_spans if s.name == "specdec.v1.GenerationService/Complete"]
    assert rpc.kind == SERVER and rpc.parent_span_id == caller_span and rpc.service == "specdec-coordinator"
    (generation,) = [s for s in request_spans if s.name == "specdec.generation"]
    assert generation.parent_span_id == rpc.span_id
    assert generation.attributes["specdec.generated_tokens"] == stats.generated_tokens
    steps = [s for s in request_spans if s.name == "specdec.step"]
    assert steps and all(s.parent_span_id == generation.span_id for s in steps)
    assert all(s.service == "specdec-coordinator" for s in [rpc, generation, *steps])

    # the tiers' item spans are children of the coordinator's step spans (across processes)
    for name, service in (("draft.propose", "specdec-draft"), ("target.verify", "specdec-target")):
        items = [s for s in request_spans if s.name == name]
        assert len(items) >= len(steps) - 1, name  # the last step may draft nothing (1 token left)
        for item in items:
            assert item.service == service and item.kind == SERVER
            assert by_id[item.parent_span_id].name == "specdec.step", name
    step_ids = {s.span_id for s in steps}
    assert step_ids == {s.parent_span_id for s in request_spans if s.name == "target.verify"}

    # every step's verification ran in a batch span of its own, linked to the step
    batches = [s for s in spans if s.name == "target.verify_batch"]
    assert batches and all(s.service == "specdec-target" and s.parent_span_id == "" for s in batches)
    linked = {(t, sid) for b in batches for t, sid, _ in b.links}
    assert {(caller_trace, sid) for sid in step_ids} <= linked
    batch_ids = {b.span_id for b in batches}
    for verify in (s for s in request_spans if s.name == "target.verify"):
        assert {sid for _, sid, _ in verify.links} & batch_ids, "item span links back to its batch"
        assert verify.attributes["specdec.batch.size"] >= 1

    # KV reads from Redis happen inside the batched forward pass: children of its span
    all_batches = {b.span_id: b for b in spans if b.name.endswith("_batch")}
    kv_reads = [s for s in spans if s.name == "kv.restore"]
    assert kv_reads and all(all_batches[s.parent_span_id].trace_id == s.trace_id for s in kv_reads)
    assert all("specdec.kv.hit_chunks" in s.attributes for s in kv_reads)

    # step spans carry the counts: they add up to the response's statistics
    assert sum(s.attributes["specdec.committed_tokens"] for s in steps) == stats.generated_tokens
    assert sum(s.attributes["specdec.accepted_tokens"] for s in steps) == stats.accepted_tokens
    assert sum(s.attributes["specdec.draft_tokens"] for s in steps) == stats.proposed_tokens
    assert len(steps) == stats.steps
    assert all(s.attributes["specdec.target.replica"] and s.attributes["specdec.draft.replica"] for s in steps)
