"""GenerationService: protobuf in, the speculation loop over remote tiers, protobuf out.

With Redis, each request with a request_id is indexed and leased (`state/sessions.py`): a
coordinator that receives a request whose record exists continues it from the record
(`resume.py`) instead of starting anew, and only one coordinator runs it at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import grpc

from specdec.config import Settings
from specdec.coordinator.admission import Admission
from specdec.coordinator.remote import RemoteDrafter, RemoteVerifier
from specdec.coordinator.resume import (
    CannotResume,
    Delivery,
    RunningElsewhere,
    fingerprint,
    finish_reason,
    merged_stats,
    released_text,
    request_from_record,
    stats_counters,
)
from specdec.coordinator.routing import ReplicaPool
from specdec.core.detokenize import IncrementalDetokenizer
from specdec.core.drafters.registry import NONE, parse_drafter
from specdec.core.errors import InvalidArgument
from specdec.core.generation import Chunk, GenerationResult, chunk_logprobs, generate_stream
from specdec.core.interfaces import Tiers
from specdec.core.loop import GenerationRequest, Step
from specdec.core.models import load_tokenizer, resolve_model_path
from specdec.core.request import (
    ModelLimits,
    RequestSpec,
    build_request,
    check_sizes,
    continued_sampling,
    longest_token_chars,
)
from specdec.core.stats import SpecStats
from specdec.core.tokenizer import Tokenizer
from specdec.rpc.convert import constraint_from_proto, logprobs_to_proto, stats_to_proto
from specdec.rpc.errors import grpc_errors
from specdec.rpc.server import TierServer, tls_files
from specdec.rpc.streams import Dial
from specdec.state.registry import IntervalRates, Load, Registry
from specdec.state.sessions import SETTLE_WAIT_S, Leases, SessionRecord, SessionStore, request_digest
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
FINISH = {
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "stop": generation_pb2.FINISH_REASON_STOP,
    "context": generation_pb2.FINISH_REASON_CONTEXT,
}
OWNER_WAIT_S = 60.0  # a request_id that a live coordinator runs: wait this long for it to let go
OWNER_POLL_S = 0.05  # ... reading its lease this often
OWNER_PROBE_S = 1.0  # a lease holder whose port does not accept a connection within this is dead
DEAD_FOR_S = 10.0  # ... and is not asked again for this long


@dataclass
class _Claim:
    """This coordinator's hold on one request_id while it serves it."""

    ended: asyncio.Event = field(default_factory=asyncio.Event)
    lost: bool = False  # the lease went to another coordinator: stop
    record_id: str = ""


@dataclass
class _Run:
    """One request as this coordinator serves it: new, or continued from its record."""

    spec: RequestSpec
    stops: list[str]
    record_id: str  # the record's key (the first run's session id); kept across resumes
    digest: str | None  # the index entry (None: no request_id, or no Redis)
    fingerprint: str
    prompt_ids: list[int]  # the request's own prompt
    max_new_tokens: int  # of the whole request
    request: GenerationRequest | None  # the loop to run; None when the output is complete
    claim: _Claim
    record: SessionRecord | None = None  # the record it continues
    history: list[int] = field(default_factory=list)  # tokens committed before this run
    before: dict[str, float] = field(default_factory=dict)  # the record's statistics
    detok: IncrementalDetokenizer | None = None  # a continued run's: fed the history first
    finished: str | None = None  # the finish reason of an output that is already complete
    final_text: str = ""  # ... and its text


class Coordinator:
    """Validates requests, runs each one's loop against the remote tiers, records sessions."""

    def __init__(self, settings: Settings, tokenizer: Tokenizer, limits: ModelLimits) -> None:
        self.settings, self.tokenizer, self.limits = settings, tokenizer, limits
        registry = Registry(settings.redis_url, settings.redis_prefix) if settings.redis_url else None
        self.registry = registry
        self.sessions = SessionStore(settings.redis_url, settings.redis_prefix) if settings.redis_url else None
        dial = Dial(tls_files(settings), settings.internal_token)  # mTLS, or the internal token
        self.draft_pool = ReplicaPool(
            "draft",
            registry,
            settings.draft_addresses,
            lambda ch: draft_pb2_grpc.DraftServiceStub(ch).Propose(),  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
            lambda items, rel: draft_pb2.ProposeRequest(items=items, release_session_ids=rel),
            dial,
        )
        self.target_pool = ReplicaPool(
            "target",
            registry,
            settings.target_addresses,
            lambda ch: target_pb2_grpc.TargetServiceStub(ch).Verify(),  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
            lambda items, rel: target_pb2.VerifyRequest(items=items, release_session_ids=rel),
            dial,
        )
        self.tiers = Tiers(
            RemoteVerifier(self.target_pool, settings.tier_timeout_s, settings.max_failovers),
            RemoteDrafter(self.draft_pool, settings.tier_timeout_s, settings.max_failovers),
        )
        self.default_drafter = parse_drafter(settings.drafter, "SPECDEC_DRAFTER")
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.admission = Admission(settings.max_running_requests, settings.max_queued_requests)
        self.active = 0  # requests running (admitted)
        self.generated_tokens = 0
        self.proposed_tokens = 0  # drafts of finished requests
        self.accepted_tokens = 0
        self.rates = IntervalRates()
        instance = uuid.uuid4().hex[:12]
        self.owner = f"{settings.advertise_host or settings.host}:{settings.port_for('coordinator')}/{instance}"
        self.leases = Leases(self.sessions, self.owner, self._lost) if self.sessions is not None else None
        self._claims: dict[str, _Claim] = {}  # request digest -> this coordinator's claim
        self._probes: dict[str, asyncio.Future[bool]] = {}  # lease holder -> its health probe in flight
        self._dead: dict[str, float] = {}  # lease holder -> when it was found dead
        observe(
            "specdec_replicas",
            lambda: [(pool.healthy_count(), {"tier": pool.tier}) for pool in (self.draft_pool, self.target_pool)],
        )

    async def drafters(self) -> list[str]:
        served = {d for r in await self.draft_pool.replicas() for d in r.drafters}
        return sorted({"ngram", str(self.default_drafter), *served} - {NONE})

    def set_address(self, address: str, replica_id: str) -> None:
        """The address this coordinator serves on, as others reach it, and its id in the
        registry: together they name its leases."""
        self.owner = f"{address}/{replica_id}"
        if self.leases is not None:
            self.leases.owner = self.owner

    async def stream(self, spec: RequestSpec, result: GenerationResult, resume_from: int = 0) -> AsyncIterator[Chunk]:
        """The request's chunks after the first `resume_from` tokens (which the client holds
        from an earlier stream of the same request_id); `result` gets the whole output."""
        if resume_from and not spec.request_id:
            raise InvalidArgument("resume_from", "resuming a request needs its request_id")
        if resume_from > self.limits.max_new_tokens:
            raise InvalidArgument(
                "resume_from", f"at most max_new_tokens ({self.limits.max_new_tokens}), got {resume_from}"
            )
        check_sizes(spec, self.limits)  # before the fingerprint below hashes the prompt
        digest = fp = None
        if self.sessions is not None and spec.request_id:
            # In proportion to the prompt: off the event loop, like tokenizing.
            fp = await asyncio.get_running_loop().run_in_executor(self._tokenizing, fingerprint, spec)
            digest = request_digest(spec.request_id, fp)
        async with self._claim(digest) as claim:
            run = await self._prepare(spec, digest, fp or "", claim, resume_from)
            claim.record_id = run.record_id
            delivery = Delivery(resume_from, lambda ids: released_text(self.tokenizer, run.stops, ids))
            if run.request is None:
                for chunk in self._replay(run, result, delivery):
                    yield chunk
                return
            self._record(run, "queued", run.history, run.before)
            # aclosing: a client that goes away closes the run at once, releasing its slot and
            # its sessions on the tiers.
            async with self.admission.slot(), aclosing(self._run(run, result, delivery)) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def _prepare(self, spec: RequestSpec, digest: str | None, fp: str, claim: _Claim, resume_from: int) -> _Run:
        """The run: the request's record continued when there is one, else a new request."""
        loop = asyncio.get_running_loop()
        found = await self._find(digest, spec.request_id, fp) if digest is not None else None
        if found is not None:
            run = await loop.run_in_executor(self._tokenizing, self._continued, spec, digest, fp, claim, *found)
            if run is not None:
                if run.request is not None:
                    await self._release_orphan(run.record)
                return run
        drafters = await self.drafters()
        # Tokenizing (and a chat template) takes time in proportion to the prompt: off the
        # event loop, so other streams and the health check are not kept waiting; on one
        # thread, because a transformers tokenizer is not safe to call from several at once.
        request, stops = await loop.run_in_executor(
            self._tokenizing,
            build_request,
            spec,
            self.tokenizer,
            self.limits,
            self.default_drafter,
            drafters,
            self.settings.overlap,
        )
        if resume_from and not request.sampling.greedy and spec.seed is None:
            # The held tokens were sampled with a seed drawn for them, and the record that kept it is gone.
            raise CannotResume(
                "the request's session record is gone and it samples without a seed: "
                "its held tokens cannot be continued; send it again without resume_from"
            )
        return _Run(
            spec, stops, request.session_id, digest, fp, request.prompt_ids, request.max_new_tokens, request, claim
        )

    def _continued(
        self, spec: RequestSpec, digest: str | None, fp: str, claim: _Claim, record_id: str, record: SessionRecord
    ) -> _Run | None:
        """The run that continues `record` (on the tokenizing thread: it detokenizes the
        history); None when the record does not describe a request this coordinator can run."""
        history = list(record.generated_ids)
        detok = IncrementalDetokenizer(self.tokenizer, record.stop)
        stopped = detok.add(history).stopped
        finished = finish_reason(record, self.limits.max_context, stopped)
        run = _Run(
            spec,
            list(record.stop),
            record_id,
            digest,
            fp,
            list(record.prompt_ids),
            record.max_new_tokens,
            None,
            claim,
            record=record,
            history=history,
            before=dict(record.stats),
            detok=detok,
            finished=finished,
        )
        if finished is not None:
            run.final_text = released_text(self.tokenizer, record.stop, history, final=True)
            return run
        try:
            run.request = request_from_record(record, uuid.uuid4().hex, self.limits.max_context)
            run.request.sampling = continued_sampling(
                run.request.sampling, spec, len(record.prompt_ids), run.request.stop_token_ids
            )
        except (ValueError, InvalidArgument) as exc:
            log.warning(
                "session record %s cannot be continued (%s); starting the request anew", record_id[:64], str(exc)[:200]
            )
            return None
        log.info(
            "request %s continues from its record: %d tokens committed (%s)",
            spec.request_id[:64],
            len(history),
            record.state,
        )
        return run

    def _replay(self, run: _Run, result: GenerationResult, delivery: Delivery) -> list[Chunk]:
        """A request whose output is complete: the part the client lacks, and `result`."""
        assert run.finished is not None
        if delivery.held > len(run.history):
            raise InvalidArgument("resume_from", f"the request has {len(run.history)} tokens, not {delivery.held}")
        result.token_ids, result.text, result.finish_reason = list(run.history), run.final_text, run.finished
        result.stats = merged_stats(
            run.before, SpecStats(drafter=run.record.drafter if run.record else "none"), len(run.prompt_ids)
        )
        if run.record is not None and run.record.state != "done" and self.sessions is not None:
            self.sessions.update(
                run.record_id,
                dataclasses.replace(
                    run.record, state="done", finish_reason=run.finished, owner=self.owner, updated_at=time.time()
                ),
                index=run.digest,
            )
        out = delivery.add(run.history, run.final_text)
        return [] if out is None else [Chunk(out[0], out[1], Step(out[0], run.finished))]

    async def _run(self, run: _Run, result: GenerationResult, delivery: Delivery) -> AsyncGenerator[Chunk, None]:
        request = run.request
        assert request is not None
        detok = run.detok
        continued = detok is not None
        # A continued run's loop starts after the history: its own result and detokenizer
        # know only the new tokens, so text and stop strings come from the run's detokenizer.
        inner = GenerationResult() if continued else result
        self.active += 1
        self._record(run, "running", run.history, run.before)
        try:
            if detok is not None and (first := delivery.add(run.history, detok.text)) is not None:
                yield Chunk(first[0], first[1], Step(first[0]))  # committed but never delivered
            chunks = generate_stream(request, self.tiers, self.tokenizer, [] if continued else run.stops, inner)
            # Close both generators when the client goes away: that releases the session on the tiers.
            step, stopped = None, False
            async with aclosing(chunks) as steps, aclosing(traced_chunks(steps, request, inner)) as stream:
                async for chunk in stream:
                    step, text = chunk.step, chunk.text
                    if detok is not None:
                        delta = detok.add(chunk.token_ids, final=step.finish_reason is not None)
                        text, stopped = delta.text, delta.stopped
                    self.generated_tokens += len(chunk.token_ids)
                    out = delivery.add(chunk.token_ids, text)
                    self._record(run, "running", delivery.tokens, self._stats(run, inner), step)
                    if out is not None and self.sessions is not None:
                        # The record first: a coordinator that dies now leaves one that holds
                        # every token its client has, so a resume need not regenerate any.
                        await self.sessions.settled(run.record_id, SETTLE_WAIT_S)
                    if run.claim.lost:
                        raise RunningElsewhere("another coordinator took this request over")
                    if out is not None:
                        yield Chunk(out[0], out[1], step)
                    if stopped:
                        break
            if detok is not None:
                result.token_ids, result.text = list(delivery.tokens), detok.text
                result.finish_reason = "stop" if stopped else inner.finish_reason
                result.stats = self._stats(run, inner)
            self._record(run, "done", delivery.tokens, stats_counters(result.stats), step, result.finish_reason)
            if delivery.held > len(delivery.tokens):  # the client said it held more than there is
                raise InvalidArgument(
                    "resume_from", f"the request has {len(delivery.tokens)} tokens, not {delivery.held}"
                )
        finally:
            self.active -= 1
            self.proposed_tokens += inner.stats.proposed_tokens
            self.accepted_tokens += inner.stats.accepted_tokens

    def _stats(self, run: _Run, inner: GenerationResult) -> SpecStats:
        """The whole request's statistics: the record's, plus this run's."""
        if run.detok is None:
            return inner.stats
        return merged_stats(run.before, inner.stats, len(run.prompt_ids))

    def _record(
        self,
        run: _Run,
        state: str,
        tokens: list[int],
        stats: SpecStats | dict[str, float],
        step: Step | None = None,
        finish: str | None = None,
    ) -> None:
        if self.sessions is None or run.request is None:
            return
        request, s = run.request, run.request.sampling
        placement = {"draft": step.draft_replica, "target": step.target_replica} if step else {}
        self.sessions.update(
            run.record_id,
            SessionRecord(
                request_id=run.spec.request_id or run.record_id,
                fingerprint=run.fingerprint,
                state=state,
                prompt_ids=run.prompt_ids,
                generated_ids=list(tokens),
                max_new_tokens=run.max_new_tokens,
                sampling={"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed},
                drafter=str(request.drafter),
                max_draft_tokens=request.max_draft_tokens,
                adaptive=request.adaptive,
                overlap=request.overlap,
                stop=run.stops,
                stop_token_ids=sorted(request.stop_token_ids),
                tier_session_id=request.session_id,
                finish_reason=finish,
                stats=stats if isinstance(stats, dict) else stats_counters(stats),
                placement={k: v for k, v in placement.items() if v},
                owner=self.owner,
                updated_at=time.time(),
            ),
            index=run.digest,
        )

    async def _find(self, digest: str, request_id: str, fp: str) -> tuple[str, SessionRecord] | None:
        assert self.sessions is not None
        try:
            return await self.sessions.find(digest, request_id, fp, self.limits.vocab_size, self.limits.max_context)
        except Exception as exc:  # Redis down: the request runs anew (its record is what is lost)
            log.warning("session record lookup failed (%s); the request runs anew", exc)
            return None

    @contextlib.asynccontextmanager
    async def _claim(self, digest: str | None) -> AsyncIterator[_Claim]:
        """Hold the request's lease while it is served here: one coordinator runs a
        request_id at a time. A lease held by a coordinator that is gone is taken over at
        once; one held by a live coordinator (the same request sent twice, or a client that
        came back before its old stream noticed it left) is waited for."""
        claim = _Claim()
        held = digest is not None and self.leases is not None and await self._acquire(digest)
        if held:
            assert digest is not None
            self._claims[digest] = claim
        try:
            yield claim
        finally:
            claim.ended.set()
            if held and self._claims.get(digest or "") is claim:
                del self._claims[digest or ""]
            if self.sessions is not None and claim.record_id:
                # The next holder must read the last record this one wrote. Both bounded: the
                # done message waits for them, and Redis may be slow (then the lease expires).
                await self.sessions.settled(claim.record_id, SETTLE_WAIT_S)
                self.sessions.forget(claim.record_id)
            if held and self.leases is not None and digest is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.leases.release(digest), OWNER_PROBE_S)

    async def _acquire(self, digest: str) -> bool:
        """Take the request's lease (True), waiting for a live holder; False when Redis is
        down (the request runs unleased rather than not at all)."""
        assert self.leases is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OWNER_WAIT_S
        while True:
            try:
                holder = await self.leases.take(digest)
                if holder is None:
                    return True
                if holder and holder != self.owner and not await self._alive(holder):
                    log.info("request lease %s: holder %s is gone; taking the request over", digest, holder[:100])
                    holder = await self.leases.take(digest, dead_holder=holder)
                    if holder is None:
                        return True
            except Exception as exc:
                log.warning("request lease unavailable (%s); running without one", exc)
                return False
            if not holder:
                continue  # released meanwhile
            mine = self._claims.get(digest) if holder == self.owner else None
            if holder == self.owner and mine is None:
                # Ours, with no run behind it (a release that failed): take it back.
                if await self.leases.take(digest, dead_holder=holder) is None:
                    return True
                continue
            if loop.time() >= deadline:
                raise RunningElsewhere(f"request is running on another coordinator for over {OWNER_WAIT_S:.0f} s")
            if mine is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(mine.ended.wait(), max(0.0, deadline - loop.time()))
            else:
                await asyncio.sleep(OWNER_POLL_S)  # another process's state: read it again shortly

    async def _alive(self, holder: str) -> bool:
        """Whether a lease holder still runs: this very instance registered as a coordinator
        (a restarted one has a new id) and its port accepting connections (a process killed
        a moment ago is still registered for a few heartbeats). Concurrent requests share one
        probe, and a holder found dead is not asked again for a while."""
        now = time.monotonic()
        if now - self._dead.get(holder, -DEAD_FOR_S) < DEAD_FOR_S:
            return False
        probe = self._probes.get(holder)
        if probe is None:
            probe = self._probes[holder] = asyncio.ensure_future(self._probe(holder))
            probe.add_done_callback(lambda _: self._probes.pop(holder, None))
        alive = await asyncio.shield(probe)
        if not alive:
            self._dead = {h: t for h, t in self._dead.items() if now - t < DEAD_FOR_S}
            self._dead[holder] = now
        return alive

    async def _probe(self, holder: str) -> bool:
        address, _, instance = holder.rpartition("/")
        if self.registry is not None:
            try:
                listed = {(r.address, r.replica_id) for r in await self.registry.replicas("coordinator")}
                if (address, instance) not in listed:
                    return False  # expired, restarted, or never a coordinator
            except Exception as exc:  # Redis unreadable: the connection alone decides
                log.debug("registry read failed: %s", exc)
        host, _, port = address.rpartition(":")
        try:
            # A connection, not an RPC: whatever TLS or API keys the port asks for, a live
            # process accepts it; a dead one's port refuses it at once.
            _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), OWNER_PROBE_S)
        except (OSError, ValueError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    def _lost(self, digest: str) -> None:
        claim = self._claims.get(digest)
        if claim is not None:
            claim.lost = True

    async def _release_orphan(self, record: SessionRecord | None) -> None:
        """A dead coordinator's sessions stay on the tiers until evicted: release the
        record's, on the replicas it names (only replicas this coordinator routes to)."""
        if record is None or not record.tier_session_id or record.owner == self.owner:
            return
        for pool in (self.draft_pool, self.target_pool):
            address = record.placement.get(pool.tier)
            try:
                if address and address in {r.address for r in await pool.replicas()}:
                    pool.placement[record.tier_session_id] = address
                    (await pool.client_for(record.tier_session_id)).release(record.tier_session_id)
                    pool.placement.pop(record.tier_session_id, None)
            except Exception as exc:  # best effort: an unreleased session is evicted later anyway
                log.debug("releasing orphaned session failed: %s", exc)

    def load(self) -> Load:
        rates = self.rates.read(self.generated_tokens, self.proposed_tokens, self.accepted_tokens)
        return Load(
            queue_depth=self.admission.waiting,
            active_sessions=self.active,
            tokens_per_s=rates.tokens_per_s,
            acceptance_rate=rates.acceptance_rate,
            extra={"generated_tokens": self.generated_tokens},
        )


def spec_from_proto(m: generation_pb2.GenerateRequest | generation_pb2.CompleteRequest) -> RequestSpec:
    which = m.WhichOneof("input")
    if which is None:
        raise InvalidArgument("input", "give one of prompt, chat or token_ids")
    d, s = m.decoding, m.speculation

    def opt(msg: generation_pb2.DecodingParams | generation_pb2.SpeculationParams, name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None  # None: left unset (proto3 optional)

    grammar_kind, grammar = constraint_from_proto(d.constraint)

    return RequestSpec(
        prompt=m.prompt if which == "prompt" else None,
        messages=[{"role": x.role, "content": x.content} for x in m.chat.messages] if which == "chat" else None,
        token_ids=list(m.token_ids.ids) if which == "token_ids" else None,
        max_new_tokens=opt(d, "max_new_tokens"),
        temperature=opt(d, "temperature"),
        top_k=opt(d, "top_k"),
        top_p=opt(d, "top_p"),
        seed=opt(d, "seed"),
        stop=list(d.stop),
        stop_token_ids=list(d.stop_token_ids),
        ignore_eos=d.ignore_eos,
        drafter=opt(s, "drafter"),
        max_draft_tokens=opt(s, "max_draft_tokens"),
        adaptive=opt(s, "adaptive"),
        overlap=opt(s, "overlap"),
        request_id=m.request_id,
        logprobs=opt(d, "logprobs"),
        min_p=opt(d, "min_p"),
        presence_penalty=opt(d, "presence_penalty"),
        frequency_penalty=opt(d, "frequency_penalty"),
        repetition_penalty=opt(d, "repetition_penalty"),
        grammar_kind=grammar_kind,
        grammar=grammar,
        logit_bias=dict(d.logit_bias) or None,
        min_tokens=opt(d, "min_tokens"),
    )


@contextlib.asynccontextmanager
async def _resume_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Resumption's own outcomes as status codes (the rest map in `grpc_errors`)."""
    try:
        yield
    except CannotResume as exc:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)[:500])
    except RunningElsewhere as exc:
        await context.abort(grpc.StatusCode.ABORTED, str(exc)[:500])


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    @grpc_errors
    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        result = GenerationResult()
        async with _resume_errors(context):
            async for chunk in self.coordinator.stream(spec_from_proto(request), result, request.resume_from):
                yield generation_pb2.GenerateResponse(
                    request_id=request.request_id,
                    chunk=generation_pb2.TokenChunk(
                        token_ids=chunk.token_ids, text=chunk.text, logprobs=logprobs_to_proto(chunk_logprobs(chunk))
                    ),
                )
        yield generation_pb2.GenerateResponse(
            request_id=request.request_id,
            done=generation_pb2.GenerationDone(
                finish_reason=FINISH[result.finish_reason], stats=stats_to_proto(result.stats)
            ),
        )

    @grpc_errors
    async def Complete(
        self, request: generation_pb2.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.CompleteResponse:
        result = GenerationResult()
        async with _resume_errors(context):
            async for _ in self.coordinator.stream(spec_from_proto(request), result):
                pass
        return generation_pb2.CompleteResponse(
            request_id=request.request_id,
            text=result.text,
            token_ids=result.token_ids,
            finish_reason=FINISH[result.finish_reason],
            stats=stats_to_proto(result.stats),
            logprobs=logprobs_to_proto(result.logprobs),
        )


def build(settings: Settings) -> TierServer:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(settings.model))
    tokenizer = load_tokenizer(settings.model)
    limits = ModelLimits(
        vocab_size=config.vocab_size,
        max_context=getattr(config, "max_position_embeddings", 1 << 20),
        max_new_tokens=settings.max_new_tokens,
        max_token_chars=longest_token_chars(tokenizer),
    )
    coordinator = Coordinator(settings, tokenizer, limits)
    name = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
    server = TierServer(
        "coordinator",
        settings,
        [name],
        lambda server: generation_pb2_grpc.add_GenerationServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
            GenerationServicer(coordinator), server
        ),
        coordinator.load,
        model=settings.model,
    )
    coordinator.set_address(server.address, server.info.replica_id)
    if settings.http_port:  # the OpenAI-compatible front: same process, loop and Coordinator.stream
        from specdec.http.app import HttpFront

        server.companions.append(HttpFront(coordinator, settings))
    return server
