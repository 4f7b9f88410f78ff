"""GenerationService: protobuf in, the speculation loop over remote tiers, protobuf out."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any

import grpc

from specdec.config import Settings
from specdec.coordinator.admission import Admission
from specdec.coordinator.remote import RemoteDrafter, RemoteVerifier
from specdec.coordinator.routing import ReplicaPool
from specdec.core.drafters.registry import NONE, parse_drafter
from specdec.core.errors import InvalidArgument
from specdec.core.generation import Chunk, GenerationResult, generate_stream
from specdec.core.interfaces import Tiers
from specdec.core.loop import GenerationRequest, Step
from specdec.core.models import load_tokenizer, resolve_model_path
from specdec.core.request import ModelLimits, RequestSpec, build_request, check_sizes, longest_token_chars
from specdec.core.tokenizer import Tokenizer
from specdec.rpc.convert import stats_to_proto
from specdec.rpc.errors import grpc_errors
from specdec.rpc.server import TierServer
from specdec.state.registry import IntervalRates, Registry
from specdec.state.sessions import SessionStore
from specdec.telemetry import observe, traced_chunks
from specdec.v1 import (
    draft_pb2,
    draft_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    target_pb2,
    target_pb2_grpc,
)

log = logging.getLogger(__name__)
FINISH = {"length": generation_pb2.FINISH_REASON_LENGTH, "stop": generation_pb2.FINISH_REASON_STOP,
          "context": generation_pb2.FINISH_REASON_CONTEXT}


class Coordinator:
    """Validates requests, runs each one's loop against the remote tiers, records sessions."""

    def __init__(self, settings: Settings, tokenizer: Tokenizer, limits: ModelLimits) -> None:
        self.settings, self.tokenizer, self.limits = settings, tokenizer, limits
        registry = Registry(settings.redis_url, settings.redis_prefix) if settings.redis_url else None
        self.registry = registry
        self.sessions = SessionStore(settings.redis_url, settings.redis_prefix) if settings.redis_url else None
        self.draft_pool = ReplicaPool(
            "draft", registry, settings.draft_addresses,
            lambda ch: draft_pb2_grpc.DraftServiceStub(ch).Propose(),  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
            lambda items, rel: draft_pb2.ProposeRequest(items=items, release_session_ids=rel))
        self.target_pool = ReplicaPool(
            "target", registry, settings.target_addresses,
            lambda ch: target_pb2_grpc.TargetServiceStub(ch).Verify(),  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
            lambda items, rel: target_pb2.VerifyRequest(items=items, release_session_ids=rel))
        self.tiers = Tiers(RemoteVerifier(self.target_pool, settings.tier_timeout_s, settings.max_failovers),
                           RemoteDrafter(self.draft_pool, settings.tier_timeout_s, settings.max_failovers))
        self.default_drafter = parse_drafter(settings.drafter, "SPECDEC_DRAFTER")
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.admission = Admission(settings.max_running_requests, settings.max_queued_requests)
        self.active = 0  # requests running (admitted)
        self.generated_tokens = 0
        self.proposed_tokens = 0  # drafts of finished requests
        self.accepted_tokens = 0
        self.rates = IntervalRates()
        observe("specdec_replicas", lambda: [(pool.healthy_count(), {"tier": pool.tier})
                                             for pool in (self.draft_pool, self.target_pool)])

    async def drafters(self) -> list[str]:
        served = {d for r in await self.draft_pool.replicas() for d in r.drafters}
        return sorted({"ngram", str(self.default_drafter), *served} - {NONE})

    async def stream(self, spec: RequestSpec, result: GenerationResult) -> AsyncIterator[Chunk]:
        check_sizes(spec, self.limits)  # cheap, and before anything is tokenized
        drafters = await self.drafters()
        # Tokenizing (and a chat template) takes time in proportion to the prompt: off the
        # event loop, so other streams and the health check are not kept waiting; on one
        # thread, because a transformers tokenizer is not safe to call from several at once.
        request, stops = await asyncio.get_running_loop().run_in_executor(
            self._tokenizing, build_request, spec, self.tokenizer, self.limits, self.default_drafter, drafters,
            self.settings.overlap)
        self._record(spec, request, result, "queued")
        # aclosing: a client that goes away closes the run at once, releasing its slot and
        # its sessions on the tiers.
        async with self.admission.slot(), aclosing(self._run(spec, request, stops, result)) as run:
            async for chunk in run:
                yield chunk

    async def _run(self, spec: RequestSpec, request: GenerationRequest, stops: list[str],
                   result: GenerationResult) -> AsyncGenerator[Chunk, None]:
        self.active += 1
        self._record(spec, request, result, "running")
        try:
            chunks = generate_stream(request, self.tiers, self.tokenizer, stops, result)
            # Close both generators when the client goes away: that releases the session on the tiers.
            step = None
            async with aclosing(chunks) as inner, aclosing(traced_chunks(inner, request, result)) as stream:
                async for chunk in stream:
                    step = chunk.step
                    self.generated_tokens += len(chunk.token_ids)
                    self._record(spec, request, result, "running", step)
                    yield chunk
            self._record(spec, request, result, "done", step)
        finally:
            self.active -= 1
            self.proposed_tokens += result.stats.proposed_tokens
            self.accepted_tokens += result.stats.accepted_tokens

    def _record(self, spec: RequestSpec, request: GenerationRequest, result: GenerationResult, state: str,
                step: Step | None = None) -> None:
        if self.sessions is None:
            return
        s = request.sampling
        self.sessions.update(request.session_id, {
            "request_id": spec.request_id, "state": state, "prompt_ids": request.prompt_ids,
            "generated_ids": result.token_ids, "max_new_tokens": request.max_new_tokens,
            "sampling": {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed},
            "drafter": str(request.drafter), "max_draft_tokens": request.max_draft_tokens,
            "placement": {"draft": step.draft_replica or None, "target": step.target_replica or None} if step else {},
            "updated_at": time.time(),
        })

    def load(self) -> dict[str, float | int | None]:
        return {"queue_depth": self.admission.waiting, "active_sessions": self.active, "batch_utilization": 0.0,
                "generated_tokens": self.generated_tokens,
                **self.rates.read(self.generated_tokens, self.proposed_tokens, self.accepted_tokens)}


def spec_from_proto(m: generation_pb2.GenerateRequest | generation_pb2.CompleteRequest) -> RequestSpec:
    which = m.WhichOneof("input")
    if which is None:
        raise InvalidArgument("input", "give one of prompt, chat or token_ids")
    d, s = m.decoding, m.speculation

    def opt(msg: generation_pb2.DecodingParams | generation_pb2.SpeculationParams, name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None  # None: left unset (proto3 optional)
    return RequestSpec(
        prompt=m.prompt if which == "prompt" else None,
        messages=[{"role": x.role, "content": x.content} for x in m.chat.messages] if which == "chat" else None,
        token_ids=list(m.token_ids.ids) if which == "token_ids" else None,
        max_new_tokens=opt(d, "max_new_tokens"), temperature=opt(d, "temperature"), top_k=opt(d, "top_k"),
        top_p=opt(d, "top_p"), seed=opt(d, "seed"), stop=list(d.stop), stop_token_ids=list(d.stop_token_ids),
        ignore_eos=d.ignore_eos, drafter=opt(s, "drafter"), max_draft_tokens=opt(s, "max_draft_tokens"),
        adaptive=opt(s, "adaptive"), overlap=opt(s, "overlap"), request_id=m.request_id,
    )


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    @grpc_errors
    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateResponse]:
        result = GenerationResult()
        async for chunk in self.coordinator.stream(spec_from_proto(request), result):
            yield generation_pb2.GenerateResponse(
                request_id=request.request_id,
                chunk=generation_pb2.TokenChunk(token_ids=chunk.token_ids, text=chunk.text))
        yield generation_pb2.GenerateResponse(request_id=request.request_id, done=generation_pb2.GenerationDone(
            finish_reason=FINISH[result.finish_reason], stats=stats_to_proto(result.stats)))

    @grpc_errors
    async def Complete(self, request: generation_pb2.CompleteRequest,
                       context: grpc.aio.ServicerContext) -> generation_pb2.CompleteResponse:
        result = GenerationResult()
        async for _ in self.coordinator.stream(spec_from_proto(request), result):
            pass
        return generation_pb2.CompleteResponse(
            request_id=request.request_id, text=result.text, token_ids=result.token_ids,
            finish_reason=FINISH[result.finish_reason], stats=stats_to_proto(result.stats))


def build(settings: Settings) -> TierServer:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(settings.model))
    tokenizer = load_tokenizer(settings.model)
    limits = ModelLimits(vocab_size=config.vocab_size, max_context=getattr(config, "max_position_embeddings", 1 << 20),
                         max_new_tokens=settings.max_new_tokens, max_token_chars=longest_token_chars(tokenizer))
    coordinator = Coordinator(settings, tokenizer, limits)
    name = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
    return TierServer(
        "coordinator", settings, [name],
        lambda server: generation_pb2_grpc.add_GenerationServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
            GenerationServicer(coordinator), server),
        coordinator.load, model=settings.model)
