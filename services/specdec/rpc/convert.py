"""protobuf <-> core types. Probabilities travel as packed little-endian float16."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams, renormalised_f16
from specdec.core.stats import SpecStats
from specdec.core.types import Proposal, ProposeItem, TokenLogprob, Verdict, VerifyItem
from specdec.v1 import draft_pb2, generation_pb2, sampling_pb2, target_pb2


def probs_to_bytes(probs: torch.Tensor | None) -> bytes:
    if probs is None:
        return b""
    # numpy, not torch: this runs on gRPC threads (see core.compute)
    return probs.detach().cpu().numpy().astype("<f2").tobytes()


def probs_from_bytes(data: bytes, rows: int) -> torch.Tensor | None:
    """Rebuild q exactly as the drafter sampled from it (float16, renormalised in float64)."""
    if not data:
        return None
    if rows == 0 or len(data) % (2 * rows):
        raise InvalidArgument("draft_probs_f16", f"{len(data)} bytes are not {rows} rows of float16")
    return renormalised_f16(np.frombuffer(data, dtype="<f2").reshape(rows, -1))


def sampling_to_proto(p: SamplingParams) -> sampling_pb2.SamplingParams:
    return sampling_pb2.SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        seed=p.seed,
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty != 1.0 else None,
        prompt_len=p.prompt_len,
        constraint=constraint_to_proto(p.grammar_kind, p.grammar),
        logit_bias=dict(p.logit_bias),
        min_tokens=p.min_tokens,
        min_tokens_ids=p.min_tokens_ids,
    )


def sampling_from_proto(m: sampling_pb2.SamplingParams) -> SamplingParams:
    kind, source = constraint_from_proto(m.constraint)
    return SamplingParams(
        temperature=m.temperature,
        top_k=m.top_k,
        top_p=m.top_p,
        seed=m.seed,
        min_p=m.min_p,
        presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty,
        repetition_penalty=m.repetition_penalty if m.HasField("repetition_penalty") else 1.0,
        prompt_len=m.prompt_len,
        grammar_kind=kind,
        grammar=source,
        logit_bias=tuple(sorted(m.logit_bias.items())),
        min_tokens=m.min_tokens,
        min_tokens_ids=tuple(m.min_tokens_ids),
    )


def constraint_to_proto(kind: str, source: str) -> sampling_pb2.Constraint:
    if kind == "json_object":
        return sampling_pb2.Constraint(json_object=True)
    if kind == "json_schema":
        return sampling_pb2.Constraint(json_schema=source)
    if kind == "regex":
        return sampling_pb2.Constraint(regex=source)
    return sampling_pb2.Constraint()


def constraint_from_proto(m: sampling_pb2.Constraint) -> tuple[str, str]:
    """-> (kind, source) as SamplingParams spells them; ("", "") when none is set.
    `json_object: false` is no constraint."""
    kind = m.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not m.json_object):
        return "", ""
    return kind, "" if kind == "json_object" else getattr(m, kind)


def propose_item_to_proto(tag: int, item: ProposeItem, traceparent: str = "") -> draft_pb2.ProposeItem:
    return draft_pb2.ProposeItem(
        tag=tag,
        session_id=item.session_id,
        prefix_len=item.prefix_len,
        tokens=item.tokens,
        num_tokens=item.num_tokens,
        sampling=sampling_to_proto(item.sampling),
        drafter=item.drafter,
        traceparent=traceparent,
    )


def propose_item_from_proto(m: draft_pb2.ProposeItem) -> ProposeItem:
    return ProposeItem(
        m.session_id, m.prefix_len, list(m.tokens), m.num_tokens, sampling_from_proto(m.sampling), m.drafter or "ngram"
    )


def proposal_to_proto(tag: int, p: Proposal) -> draft_pb2.ProposeResult:
    return draft_pb2.ProposeResult(
        tag=tag,
        tokens=p.tokens,
        draft_probs_f16=probs_to_bytes(p.probs),
        needs_resync=p.needs_resync,
        draft_pass_base_seconds=p.draft_pass_base_s,
        draft_row_seconds=p.draft_row_s,
        parents=p.parents or [],
    )


def proposal_from_proto(m: draft_pb2.ProposeResult, replica: str = "") -> Proposal:
    tokens = list(m.tokens)
    return Proposal(
        tokens,
        probs_from_bytes(m.draft_probs_f16, len(tokens)),
        m.needs_resync,
        m.draft_pass_base_seconds,
        m.draft_row_seconds,
        replica,
        parents=tree_from_proto("parents", m.parents, len(tokens)),
    )


def verify_item_to_proto(tag: int, item: VerifyItem, traceparent: str = "") -> target_pb2.VerifyItem:
    return target_pb2.VerifyItem(
        tag=tag,
        session_id=item.session_id,
        prefix_len=item.prefix_len,
        tokens=item.tokens,
        draft_tokens=item.draft_tokens,
        draft_probs_f16=probs_to_bytes(item.draft_probs),
        sampling=sampling_to_proto(item.sampling),
        traceparent=traceparent,
        logprobs=item.logprobs if item.logprobs >= 0 else None,
        draft_parents=item.draft_parents or [],
    )


def verify_item_from_proto(m: target_pb2.VerifyItem) -> VerifyItem:
    drafts = list(m.draft_tokens)
    return VerifyItem(
        m.session_id,
        m.prefix_len,
        list(m.tokens),
        drafts,
        probs_from_bytes(m.draft_probs_f16, len(drafts)),
        sampling_from_proto(m.sampling),
        m.logprobs if m.HasField("logprobs") else -1,
        list(m.draft_parents) or None,  # the target's check_item judges the tree
    )


def tree_from_proto(field: str, parents: Iterable[int], num_tokens: int) -> list[int] | None:
    """A drafted tree's parents, checked (a draft replica is a stranger too); None for a chain."""
    tree = list(parents)
    if not tree:
        return None
    if len(tree) != num_tokens or any(not -1 <= p < i for i, p in enumerate(tree)):
        raise InvalidArgument(field, f"not a tree over {num_tokens} tokens: each parent -1 or an earlier index")
    return tree


def verdict_to_proto(tag: int, v: Verdict) -> target_pb2.VerifyResult:
    return target_pb2.VerifyResult(
        tag=tag,
        num_accepted=v.num_accepted,
        tokens=v.tokens,
        batch_size=v.batch_size,
        needs_resync=v.needs_resync,
        pass_base_seconds=v.pass_base_s,
        row_seconds=v.row_s,
        logprobs=logprobs_to_proto(v.logprobs),
    )


def verdict_from_proto(m: target_pb2.VerifyResult, replica: str = "") -> Verdict:
    return Verdict(
        m.num_accepted,
        list(m.tokens),
        m.batch_size,
        m.needs_resync,
        m.pass_base_seconds,
        m.row_seconds,
        replica,
        logprobs_from_proto(m.logprobs),
    )


def logprobs_to_proto(logprobs: list[TokenLogprob]) -> list[generation_pb2.TokenLogprob]:
    return [
        generation_pb2.TokenLogprob(
            logprob=t.logprob, top_token_ids=[i for i, _ in t.top], top_logprobs=[v for _, v in t.top]
        )
        for t in logprobs
    ]


def logprobs_from_proto(ms: Iterable[generation_pb2.TokenLogprob]) -> list[TokenLogprob]:
    return [TokenLogprob(m.logprob, list(zip(m.top_token_ids, m.top_logprobs))) for m in ms]


def stats_to_proto(st: SpecStats) -> generation_pb2.SpeculationStats:
    return generation_pb2.SpeculationStats(
        prompt_tokens=st.prompt_tokens,
        generated_tokens=st.generated_tokens,
        proposed_tokens=st.proposed_tokens,
        accepted_tokens=st.accepted_tokens,
        steps=st.steps,
        acceptance_rate=st.acceptance_rate,
        mean_accepted_length=st.mean_accepted_length,
        ttft_ms=st.ttft_s * 1e3,
        elapsed_ms=st.elapsed_s * 1e3,
        tokens_per_s=st.tokens_per_s,
        mean_verify_batch_size=st.mean_verify_batch_size,
        drafter=st.drafter,
        predrafts=st.predrafts,
        predrafts_used=st.predrafts_used,
        steps_without_drafter=st.steps_without_drafter,
    )


def stats_from_proto(m: generation_pb2.SpeculationStats) -> SpecStats:
    """The counters back; rates are derived from them again (they equal the sent ones)."""
    return SpecStats(
        prompt_tokens=m.prompt_tokens,
        generated_tokens=m.generated_tokens,
        proposed_tokens=m.proposed_tokens,
        accepted_tokens=m.accepted_tokens,
        steps=m.steps,
        batch_size_sum=round(m.mean_verify_batch_size * m.steps),
        predrafts=m.predrafts,
        predrafts_used=m.predrafts_used,
        steps_without_drafter=m.steps_without_drafter,
        ttft_s=m.ttft_ms / 1e3,
        elapsed_s=m.elapsed_ms / 1e3,
        drafter=m.drafter,
    )
