"""The speculation loop, written once for local and remote tiers.

Each step: the drafter proposes k tokens after the committed ones, the verifier keeps the
longest prefix the target agrees with plus one token of its own, and the loop commits
them. Output is the target's own: the loop only decides how much to speculate.
"""
from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from specdec.core.adaptive import DraftLength, StepCosts
from specdec.core.interfaces import Drafter, Verifier
from specdec.core.sampling import SamplingParams
from specdec.core.stats import SpecStats
from specdec.core.types import Proposal, ProposeItem, VerifyItem

MAX_RESYNCS = 3

# The tiers' last reported costs, per verifier and drafter name, shared by all requests
# (see adaptive.StepCosts); weak, so a closed engine's entries go with it.
_COSTS: weakref.WeakKeyDictionary[Verifier, dict[str, StepCosts]] = weakref.WeakKeyDictionary()


@dataclass
class GenerationRequest:
    session_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    drafter: str = "none"  # "none" | "ngram" | "model:NAME"
    max_draft_tokens: int = 5
    adaptive: bool = True
    stop_token_ids: frozenset[int] = frozenset()
    max_context: int = 1 << 30
    overlap: bool = False  # pre-draft step n+1 while step n is being verified


@dataclass
class StepOutput:
    tokens: list[int]  # newly committed tokens (cut at a stop token or the length limit)
    finish_reason: str | None = None  # "length" | "stop" | "context" on the last step


@dataclass
class _Sync:
    """How many committed tokens a tier already holds for this session."""

    draft: int = 0
    target: int = 0
    resyncs: int = field(default=0)


async def speculate(request: GenerationRequest, drafter: Drafter | None, verifier: Verifier,
                    stats: SpecStats) -> AsyncIterator[StepOutput]:
    """Yield committed tokens step by step until a stop condition; frees tier state at the end."""
    committed = list(request.prompt_ids)
    sync = _Sync()
    costs = _COSTS.setdefault(verifier, {}).setdefault(request.drafter, StepCosts())
    k = DraftLength(request.max_draft_tokens if drafter is not None else 0, request.adaptive, costs=costs)
    stats.prompt_tokens, stats.drafter = len(committed), request.drafter
    predraft: asyncio.Task[Proposal] | None = None
    predraft_len = 0  # committed length at which the pending pre-draft is valid
    try:
        while True:
            remaining = request.max_new_tokens - stats.generated_tokens
            # Drafts beyond this would let accepted drafts plus the target's own token
            # overshoot max_context, which plain decoding never does.
            want = min(k.k, remaining - 1, request.max_context - len(committed) - 1)
            ready = await predraft if predraft is not None else None
            proposal = _use_predraft(ready, len(committed) == predraft_len, committed, want, stats)
            predraft = None
            if proposal is None:
                proposal = await _propose(request, drafter, committed, sync, want)
                if proposal is None:
                    continue  # drafter asked for a resync
            verifying = asyncio.ensure_future(verifier.verify(VerifyItem(
                request.session_id, sync.target, committed[sync.target:], proposal.tokens,
                proposal.probs, request.sampling)))
            if request.overlap and drafter is not None and proposal.tokens and want > 0:
                predraft = _start_predraft(request, drafter, committed, sync, proposal, want, stats)
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
            k.update(len(proposal.tokens), verdict.num_accepted, verdict.batch_size, proposal.draft_pass_base_s,
                     proposal.draft_row_s, verdict.pass_base_s, verdict.row_s)
            out = _finish(request, verdict.tokens, remaining, len(committed))
            stats.steps += 1
            stats.proposed_tokens += len(proposal.tokens)
            stats.accepted_tokens += min(verdict.num_accepted, len(out.tokens))
            stats.generated_tokens += len(out.tokens)
            stats.batch_size_sum += verdict.batch_size
            yield out
            if out.finish_reason is not None:
                return
    finally:
        if predraft is not None:
            await asyncio.gather(predraft, return_exceptions=True)
        await _release(request.session_id, drafter, verifier)


def _start_predraft(request: GenerationRequest, drafter: Drafter, committed: list[int], sync: _Sync,
                    proposal: Proposal, k: int, stats: SpecStats) -> asyncio.Task[Proposal]:
    """Draft the next step now, as if `proposal` will be accepted whole. The first token is
    the drafter's guess at the target's own token; the rest is the next draft (PEARL)."""
    stats.predrafts += 1
    item = ProposeItem(request.session_id, sync.draft, committed[sync.draft:] + proposal.tokens, k + 1,
                       request.sampling, request.drafter)
    sync.draft = len(committed) + len(proposal.tokens)
    return asyncio.ensure_future(drafter.propose(item))


def _use_predraft(predraft: Proposal | None, all_accepted: bool, committed: list[int], want: int,
                  stats: SpecStats) -> Proposal | None:
    """The pre-draft's tail when every draft was accepted and its guess equals the target's
    own token (the last committed one), else None."""
    if predraft is None or not all_accepted or predraft.needs_resync or len(predraft.tokens) < 2 or want <= 0:
        return None
    if predraft.tokens[0] != committed[-1]:
        return None
    stats.predrafts_used += 1
    tokens = predraft.tokens[1:want + 1]
    probs = None if predraft.probs is None else predraft.probs[1:want + 1]
    return Proposal(tokens, probs, draft_pass_base_s=predraft.draft_pass_base_s, draft_row_s=predraft.draft_row_s)


async def _propose(request: GenerationRequest, drafter: Drafter | None, committed: list[int],
                   sync: _Sync, k: int) -> Proposal | None:
    if drafter is None or k <= 0:
        return Proposal()
    proposal = await drafter.propose(ProposeItem(
        request.session_id, sync.draft, committed[sync.draft:], k, request.sampling, request.drafter))
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


def _finish(request: GenerationRequest, tokens: list[int], remaining: int, length: int) -> StepOutput:
    """Cut the step's tokens at the first stop token or the length limit."""
    for i, token in enumerate(tokens[:remaining]):
        if token in request.stop_token_ids:
            return StepOutput(tokens[: i + 1], "stop")
    if len(tokens) >= remaining:
        return StepOutput(tokens[:remaining], "length")
    if length >= request.max_context:
        return StepOutput(tokens, "context")
    return StepOutput(tokens)


async def _release(session_id: str, drafter: Drafter | None, verifier: Verifier) -> None:
    for tier in (drafter, verifier):
        if tier is None:
            continue
        try:
            await tier.release(session_id)
        except Exception:  # best effort: an unreleased session is evicted later anyway
            pass
