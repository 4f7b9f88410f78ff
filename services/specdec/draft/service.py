"""DraftService: propose items from every stream meet in one micro-batcher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from specdec.config import Settings
from specdec.core import compute
from specdec.core.drafters.model import ModelDrafter
from specdec.core.drafters.registry import parse_drafter
from specdec.core.drafters.worker import DraftWorker
from specdec.core.grammar import vocab_for_tokenizer
from specdec.core.kv_cache import kv_token_budget
from specdec.core.kv_fork import PrefixForks
from specdec.core.local import LocalDrafter
from specdec.core.models import load_model
from specdec.core.runner import build_runner
from specdec.core.types import Proposal, ProposeItem
from specdec.rpc import convert
from specdec.rpc.errors import item_error
from specdec.rpc.server import Drain, TierServer
from specdec.rpc.streams import serve_tagged
from specdec.state.kv_store import store_for
from specdec.state.registry import IntervalRates, Load
from specdec.telemetry import TierTelemetry
from specdec.v1 import draft_pb2, draft_pb2_grpc


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, drafter: LocalDrafter, drain: Drain | None = None) -> None:
        self.drafter, self.drain = drafter, drain or Drain()
        TELEMETRY.instrument(drafter.batcher, lambda: len(drafter.worker.sessions), drafter.worker.prefix_store)

    async def Propose(
        self, request_iterator: AsyncIterator[draft_pb2.ProposeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[draft_pb2.ProposeResponse]:
        async for response in serve_tagged(
            request_iterator, self._propose, _failed, self._release, _respond, self.drain.closing, self.drain.abandoned
        ):
            yield response

    async def _propose(self, item: draft_pb2.ProposeItem) -> draft_pb2.ProposeResult:
        proposal = await TELEMETRY.handle(
            item.traceparent,
            convert.propose_item_from_proto(item),
            self.drafter.propose,
            _item_attributes,
            _proposal_attributes,
        )
        return convert.proposal_to_proto(item.tag, proposal)

    async def _release(self, session_ids: list[str]) -> None:
        for session_id in session_ids:
            await self.drafter.release(session_id)


TELEMETRY = TierTelemetry("draft", "propose")


def _item_attributes(item: ProposeItem) -> dict[str, Any]:
    return {
        "specdec.session_id": item.session_id,
        "specdec.prefix_len": item.prefix_len,
        "specdec.new_tokens": len(item.tokens),
        "specdec.requested_tokens": item.num_tokens,
        "specdec.drafter": item.drafter,
    }


def _proposal_attributes(item: ProposeItem, proposal: Proposal) -> dict[str, Any]:
    return {"specdec.draft_tokens": len(proposal.tokens), "specdec.needs_resync": proposal.needs_resync}


def _failed(item: draft_pb2.ProposeItem, exc: Exception) -> draft_pb2.ProposeResult:
    return draft_pb2.ProposeResult(tag=item.tag, error=item_error(exc))


def _respond(results: list[draft_pb2.ProposeResult]) -> draft_pb2.ProposeResponse:
    return draft_pb2.ProposeResponse(results=results)


def build(settings: Settings) -> TierServer:
    """A draft replica serving `ngram` plus the model of `model:NAME` when configured."""
    spec = parse_drafter(settings.drafter, "SPECDEC_DRAFTER")
    model_name = spec.model
    model = compute.run_sync(load_model, model_name, settings.device, settings.dtype) if spec.needs_model else None
    runner = compute.run_sync(build_runner, model) if model is not None else None
    store = store_for(settings, "draft", model, runner) if model is not None and runner is not None else None
    budget = kv_token_budget(settings.kv_budget_mb, getattr(runner, "pool", None), settings.device)
    drafter = LocalDrafter(
        DraftWorker(
            runner,
            model_name,
            settings.max_sessions,
            store,
            budget,
            settings.session_idle_s,
            settings.prefill_chunk_s,
            settings.prefill_chunk_tokens,
            # Without a draft model, the target's tokenizer gives the grammar vocabulary.
            grammar_vocab=(lambda: vocab_for_tokenizer(settings.model)) if runner is None else None,
        ),
        settings.max_batch_size,
    )
    for method in drafter.worker.methods.values():
        if isinstance(method, ModelDrafter):
            method.forks = PrefixForks(settings.kv_fork_tokens)
    stats = drafter.batcher.stats
    rates = IntervalRates()  # read only by the heartbeat
    drain = Drain(
        flush=(lambda: asyncio.to_thread(store.flush, settings.drain_timeout_s)) if store else None,
        stalled=drafter.batcher.stalled_s,
    )
    return TierServer(
        "draft",
        settings,
        [draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name],
        lambda server: draft_pb2_grpc.add_DraftServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
            DraftServicer(drafter, drain), server
        ),
        lambda: Load(
            queue_depth=stats.queue_depth,
            active_sessions=len(drafter.worker.sessions),
            batch_utilization=drafter.batcher.utilization,
            tokens_per_s=rates.read(drafter.worker.drafted_tokens, 0, 0).tokens_per_s,
            extra=dict(store.stats.as_load()) if store is not None else {},
        ),
        model=model_name or "ngram",
        drafters=drafter.worker.drafters,
        drain=drain,
    )
