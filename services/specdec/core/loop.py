"""The speculation loop, written once for local and remote tiers.

Each step: the drafter proposes k tokens after the committed ones, the verifier keeps the
longest prefix the target agrees with plus one token of its own, and the loop commits
them. Output is the target's own: the loop only decides how much to speculate.

Each step is yielded as one `Step` record: what was committed, what was drafted and kept,
what the tiers reported, who served it and how long it waited. Request statistics,
telemetry, session records and the draft-length controller all read that record; nothing
is reconstructed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from specdec.core.adaptive import CostBook, DraftLength, StepCosts
from specdec.core.drafters.registry import NONE, DrafterSpec, parse_drafter
from specdec.core.interfaces import Drafter, Verifier
from specdec.core.sampling import SamplingParams
from specdec.core.types import Proposal, ProposeItem, TokenLogprob, Verdict, VerifyItem

MAX_RESYNCS = 3
_NO_DRAFTER = DrafterSpec(NONE)  # the default: plain decoding


@dataclass
class GenerationRequest:
    session_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    drafter: DrafterSpec = _NO_DRAFTER
    max_draft_tokens: int = 5
    adaptive: bool = True
    stop_token_ids: frozenset[int] = frozenset()
    max_context: int = 1 << 30
    overlap: bool = False  # pre-draft step n+1 while step n is being verified
    logprobs: int = -1  # -1: none; n >= 0: each token's log-probability and the top n (TokenLogprob)

    def __post_init__(self) -> None:
        self.drafter = parse_drafter(self.drafter)  # a spec string is accepted, and parsed here once


@dataclass
class Step:
    """One verified step."""

    tokens: list[int]  # newly committed tokens (cut at a stop token or the length limit)
    finish_reason: str | None = None  # "length" | "stop" | "context" on the last step
    proposed: int = 0  # draft tokens sent to the verifier
    accepted: int = 0  # of them, kept and committed
    batch_size: int = 0  # sequences in the verify pass
    reported: StepCosts = field(default_factory=StepCosts)  # what the tiers reported with this step
    predrafted: bool = False  # the next step was drafted while this one was verified
    used_predraft: bool = False  # this step's draft was the previous step's pre-draft
    drafter_unavailable: bool = False  # no replica served the request's drafter: decoded plainly
    draft_replica: str = ""  # who drafted and verified it ("" in-process)
    target_replica: str = ""
    draft_s: float = 0.0  # waiting for the draft (0 when pre-drafted)
    verify_s: float = 0.0  # waiting for the verdict
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when the request asked

    @property
    def first_rejected(self) -> int | None:
        """Index of the first draft token the target rejected, if any."""
        return self.accepted if self.accepted < self.proposed else None


@dataclass
class _Sync:
    """How many committed tokens a tier already holds for this session."""

    draft: int = 0
    target: int = 0
    resyncs: int = field(default=0)
    draft_replica: str = ""  # the replica holding the session's draft state (kept while steps draft nothing)


async def speculate(
    request: GenerationRequest, drafter: Drafter | None, verifier: Verifier, costs: CostBook
) -> AsyncGenerator[Step, None]:
    """Yield one `Step` per verification until a stop condition; frees tier state at the end.
    `costs` holds the tiers' reported costs, shared by the requests of one engine."""
    drafter = drafter if request.drafter.speculates else None
    committed = list(request.prompt_ids)
    sync = _Sync()
    k = DraftLength(
        request.max_draft_tokens if drafter is not None else 0,
        request.adaptive,
        costs=costs.for_drafter(str(request.drafter)),
        floor=not request.drafter.needs_model,  # a model-free drafter gates itself (see adaptive.py)
    )
    generated = 0
    predraft: asyncio.Task[Proposal] | None = None
    predraft_len = 0  # committed length at which the pending pre-draft is valid
    try:
        while True:
            remaining = request.max_new_tokens - generated
            # Drafts beyond this would let accepted drafts plus the target's own token
            # overshoot max_context, which plain decoding never does.
            want = min(k.k, remaining - 1, request.max_context - len(committed) - 1)
            started = time.perf_counter()
            ready = await predraft if predraft is not None else None
            proposal = _use_predraft(ready, len(committed) == predraft_len, committed, want)
            used_predraft, predraft = proposal is not None, None
            if proposal is None:
                proposal = await _propose(request, drafter, committed, sync, want)
                if proposal is None:
                    continue  # drafter asked for a resync
            drafted = time.perf_counter()
            verifying = asyncio.ensure_future(
                verifier.verify(
                    VerifyItem(
                        request.session_id,
                        sync.target,
                        committed[sync.target :],
                        proposal.tokens,
                        proposal.probs,
                        request.sampling,
                        request.logprobs,
                        proposal.parents,
                    )
                )
            )
            # A pre-draft assumes the whole draft is kept: a chain's guess, not a tree's.
            if request.overlap and drafter is not None and proposal.tokens and proposal.parents is None and want > 0:
                predraft = _start_predraft(request, drafter, committed, sync, proposal, want)
                predraft_len = len(committed) + len(proposal.tokens) + 1
            verdict = await verifying
            if verdict.needs_resync:
                _resync(sync, "target")
                continue
            sync.resyncs = 0
            if predraft is not None:  # the drafter assumed every draft would be accepted
                sync.draft = min(sync.draft, len(committed) + verdict.num_accepted)
            committed.extend(verdict.tokens)
            sync.target = len(committed)
            sync.draft_replica = proposal.replica or sync.draft_replica
            step = _step(request, proposal, verdict, remaining, len(committed))
            step.draft_replica = sync.draft_replica
            step.predrafted, step.used_predraft = predraft is not None, used_predraft
            step.draft_s, step.verify_s = drafted - started, time.perf_counter() - drafted
            k.update(step.proposed, verdict.num_accepted, step.reported)
            generated += len(step.tokens)
            yield step
            if step.finish_reason is not None:
                return
    finally:
        if predraft is not None:
            await asyncio.gather(predraft, return_exceptions=True)
        await _release(request.session_id, drafter, verifier)


def _step(request: GenerationRequest, proposal: Proposal, verdict: Verdict, remaining: int, length: int) -> Step:
    """The step record: the verdict's tokens cut at a stop token or a limit, and what it cost."""
    tokens, reason = _finish(request, verdict.tokens, remaining, length)
    reported = StepCosts(
        proposal.draft_pass_base_s, proposal.draft_row_s, verdict.pass_base_s, verdict.row_s, verdict.batch_size
    )
    return Step(
        tokens,
        reason,
        proposed=len(proposal.tokens),
        accepted=min(verdict.num_accepted, len(tokens)),
        batch_size=verdict.batch_size,
        reported=reported,
        drafter_unavailable=proposal.unavailable,
        target_replica=verdict.replica,
        logprobs=verdict.logprobs[: len(tokens)],
    )


def _start_predraft(
    request: GenerationRequest, drafter: Drafter, committed: list[int], sync: _Sync, proposal: Proposal, k: int
) -> asyncio.Task[Proposal]:
    """Draft the next step now, as if `proposal` will be accepted whole. The first token is
    the drafter's guess at the target's own token; the rest is the next draft (PEARL)."""
    item = ProposeItem(
        request.session_id,
        sync.draft,
        committed[sync.draft :] + proposal.tokens,
        k + 1,
        request.sampling,
        str(request.drafter),
    )
    sync.draft = len(committed) + len(proposal.tokens)
    return asyncio.ensure_future(drafter.propose(item))


def _use_predraft(predraft: Proposal | None, all_accepted: bool, committed: list[int], want: int) -> Proposal | None:
    """The pre-draft's tail when every draft was accepted and its guess equals the target's
    own token (the last committed one), else None."""
    if predraft is None or not all_accepted or predraft.needs_resync or len(predraft.tokens) < 2 or want <= 0:
        return None
    if predraft.tokens[0] != committed[-1]:
        return None
    tokens = predraft.tokens[1 : want + 1]
    probs = None if predraft.probs is None else predraft.probs[1 : want + 1]
    return Proposal(
        tokens,
        probs,
        draft_pass_base_s=predraft.draft_pass_base_s,
        draft_row_s=predraft.draft_row_s,
        replica=predraft.replica,
    )


async def _propose(
    request: GenerationRequest, drafter: Drafter | None, committed: list[int], sync: _Sync, k: int
) -> Proposal | None:
    if drafter is None or k <= 0:
        return Proposal()
    proposal = await drafter.propose(
        ProposeItem(request.session_id, sync.draft, committed[sync.draft :], k, request.sampling, str(request.drafter))
    )
    if proposal.needs_resync:
        _resync(sync, "draft")
        return None
    sync.draft = len(committed)
    return proposal


def _resync(sync: _Sync, tier: str) -> None:
    sync.resyncs += 1
    if sync.resyncs > MAX_RESYNCS:
        raise RuntimeError(f"{tier} tier keeps losing the session state")
    if tier == "draft":
        sync.draft = 0
    else:
        sync.target = 0


def _finish(request: GenerationRequest, tokens: list[int], remaining: int, length: int) -> tuple[list[int], str | None]:
    """Cut the step's tokens at the first stop token or the length limit."""
    for i, token in enumerate(tokens[:remaining]):
        if token in request.stop_token_ids:
            return tokens[: i + 1], "stop"
    if len(tokens) >= remaining:
        return tokens[:remaining], "length"
    if length >= request.max_context:
        return tokens, "context"
    return tokens, None


async def _release(session_id: str, drafter: Drafter | None, verifier: Verifier) -> None:
    for tier in (drafter, verifier):
        if tier is None:
            continue
        with contextlib.suppress(Exception):  # best effort: an unreleased session is evicted later anyway
            await tier.release(session_id)
