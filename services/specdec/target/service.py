"""TargetService: verify items from every stream meet in one micro-batcher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from specdec.config import Settings
from specdec.core import compute
from specdec.core.kv_cache import kv_token_budget
from specdec.core.kv_fork import PrefixForks
from specdec.core.local import LocalVerifier
from specdec.core.models import load_model
from specdec.core.runner import build_runner
from specdec.core.target import TargetWorker
from specdec.core.types import Verdict, VerifyItem
from specdec.rpc import convert
from specdec.rpc.errors import item_error
from specdec.rpc.server import Drain, TierServer
from specdec.rpc.streams import serve_tagged
from specdec.state.kv_store import RedisKVStore, store_for
from specdec.state.registry import IntervalRates, Load
from specdec.telemetry import TierTelemetry
from specdec.v1 import target_pb2, target_pb2_grpc


class TargetServicer(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, verifier: LocalVerifier, drain: Drain | None = None) -> None:
        self.verifier, self.drain = verifier, drain or Drain()
        TELEMETRY.instrument(verifier.batcher, lambda: len(verifier.worker.sessions), verifier.worker.prefix_store)

    async def Verify(
        self, request_iterator: AsyncIterator[target_pb2.VerifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[target_pb2.VerifyResponse]:
        async for response in serve_tagged(
            request_iterator, self._verify, _failed, self._release, _respond, self.drain.closing, self.drain.abandoned
        ):
            yield response

    async def _verify(self, item: target_pb2.VerifyItem) -> target_pb2.VerifyResult:
        verdict = await TELEMETRY.handle(
            item.traceparent,
            convert.verify_item_from_proto(item),
            self.verifier.verify,
            _item_attributes,
            _verdict_attributes,
        )
        return convert.verdict_to_proto(item.tag, verdict)

    async def _release(self, session_ids: list[str]) -> None:
        for session_id in session_ids:
            await self.verifier.release(session_id)


TELEMETRY = TierTelemetry("target", "verify")


def _item_attributes(item: VerifyItem) -> dict[str, Any]:
    return {
        "specdec.session_id": item.session_id,
        "specdec.prefix_len": item.prefix_len,
        "specdec.new_tokens": len(item.tokens),
        "specdec.draft_tokens": len(item.draft_tokens),
    }


def _verdict_attributes(item: VerifyItem, verdict: Verdict) -> dict[str, Any]:
    if not verdict.needs_resync:
        TELEMETRY.count("specdec_verified_draft_tokens", len(item.draft_tokens))
        TELEMETRY.count("specdec_verified_accepted_tokens", verdict.num_accepted)
    return {
        "specdec.accepted_tokens": verdict.num_accepted,
        "specdec.committed_tokens": len(verdict.tokens),
        "specdec.needs_resync": verdict.needs_resync,
    }


def _failed(item: target_pb2.VerifyItem, exc: Exception) -> target_pb2.VerifyResult:
    return target_pb2.VerifyResult(tag=item.tag, error=item_error(exc))


def _respond(results: list[target_pb2.VerifyResult]) -> target_pb2.VerifyResponse:
    return target_pb2.VerifyResponse(results=results)


class LoadMeter:
    """Load figures for the registry, from the batcher's counters."""

    def __init__(self, verifier: LocalVerifier, store: RedisKVStore | None = None) -> None:
        self.verifier, self.store = verifier, store  # store: the worker's prefix store, if any
        self.rates = IntervalRates()

    def __call__(self) -> Load:
        stats, worker = self.verifier.batcher.stats, self.verifier.worker
        w = worker.stats
        rates = self.rates.read(w.committed_tokens, w.draft_tokens, w.accepted_tokens)
        return Load(
            queue_depth=stats.queue_depth,
            active_sessions=len(worker.sessions),
            batch_utilization=self.verifier.batcher.utilization,
            tokens_per_s=rates.tokens_per_s,
            acceptance_rate=rates.acceptance_rate,
            extra={
                "max_batch_size": stats.max_batch_size,
                "prefill_tokens": w.prefill_tokens,  # prompt rows computed (running total)
                "forked_tokens": w.forked_tokens,  # prompt rows copied from another session (core/kv_fork.py)
                **(self.store.stats.as_load() if self.store else {}),
            },
        )


def build(settings: Settings) -> TierServer:
    model = compute.run_sync(load_model, settings.model, settings.device, settings.dtype)
    runner = compute.run_sync(build_runner, model)
    store = store_for(settings, "target", model, runner)
    budget = kv_token_budget(settings.kv_budget_mb, getattr(runner, "pool", None), settings.device)
    verifier = LocalVerifier(
        TargetWorker(
            runner,
            settings.max_sessions,
            store,
            budget,
            settings.session_idle_s,
            settings.prefill_chunk_s,
            settings.prefill_chunk_tokens,
        ),
        settings.max_batch_size,
    )
    verifier.worker.forks = PrefixForks(settings.kv_fork_tokens)
    drain = Drain(
        flush=(lambda: asyncio.to_thread(store.flush, settings.drain_timeout_s)) if store else None,
        stalled=verifier.batcher.stalled_s,
    )
    return TierServer(
        "target",
        settings,
        [target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name],
        lambda server: target_pb2_grpc.add_TargetServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
            TargetServicer(verifier, drain), server
        ),
        LoadMeter(verifier, store),
        model=settings.model,
        drain=drain,
    )
