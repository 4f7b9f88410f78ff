"""The draft worker: per-session drafting state and batched proposals for every drafter
that one draft replica serves."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdec.core.cost import PassCost
from specdec.core.drafters.ngram import ngram_propose
from specdec.core.errors import InvalidArgument
from specdec.core.kv_cache import SessionKV, SessionTable, sync_session
from specdec.core.prefix_store import PrefixStore, prepare_cache
from specdec.core.rng import Purpose, sample_index, uniform
from specdec.core.runner import ForwardItem, Runner
from specdec.core.sampling import probs_from_logits, quantize_f16
from specdec.core.types import Proposal, ProposeItem


def parse_drafter(spec: str) -> tuple[str, str]:
    """'none' | 'ngram' | 'model:NAME' -> (kind, model name or '')."""
    if spec in ("none", "ngram"):
        return spec, ""
    if spec.startswith("model:") and len(spec) > len("model:"):
        return "model", spec[len("model:"):]
    raise InvalidArgument("speculation.drafter", f"unknown drafter {spec!r}; use none, ngram or model:NAME")


@dataclass
class DraftSession:
    tokens: list[int] = field(default_factory=list)  # the session's committed tokens
    kv: SessionKV | None = None  # draft model cache (model drafter only)


class DraftWorker:
    """Serves `ngram` and, given a runner, `model:<model_name>`. Not thread-safe: one
    batch at a time (the batcher guarantees it)."""

    def __init__(self, runner: Runner | None = None, model_name: str = "", max_sessions: int = 1024,
                 prefix_store: PrefixStore | None = None) -> None:
        self.runner = runner
        self.model_name = model_name
        self.prefix_store = prefix_store  # shared draft-model KV chunks (e.g. Redis)
        self.sessions = SessionTable(max_sessions)
        self.drafted_tokens = 0  # running total, for the tier's load figures
        self.cost = PassCost()  # of a draft-model pass: reported with each proposal

    @property
    def drafters(self) -> list[str]:
        return ["ngram"] + ([f"model:{self.model_name}"] if self.runner is not None else [])

    def release(self, session_id: str) -> None:
        self.sessions.pop(session_id)

    def propose_batch(self, items: list[ProposeItem]) -> list[Proposal]:
        results: list[Proposal | None] = [None] * len(items)
        model_rows: list[tuple[int, DraftSession, ProposeItem]] = []
        for i, item in enumerate(items):
            session = self._sync(item)
            if session is None:
                results[i] = Proposal(needs_resync=True)
            elif item.drafter == "ngram":
                results[i] = Proposal(ngram_propose(session.tokens, item.num_tokens))
            elif self.runner is not None and item.drafter == f"model:{self.model_name}":
                model_rows.append((i, session, item))
            else:
                raise InvalidArgument("drafter", f"this replica serves {self.drafters}, not {item.drafter!r}")
        if model_rows:
            for (i, _, _), proposal in zip(model_rows, self._model_propose(model_rows)):
                results[i] = proposal
        proposals = [r for r in results if r is not None]
        self.drafted_tokens += sum(len(p.tokens) for p in proposals)
        return proposals

    def _sync(self, item: ProposeItem) -> DraftSession | None:
        return sync_session(self.sessions, item.session_id, item.prefix_len, item.tokens, DraftSession)

    def _model_propose(self, rows: list[tuple[int, DraftSession, ProposeItem]]) -> list[Proposal]:
        """Draft autoregressively, all sessions batched at each of the k steps."""
        runner = self.runner
        assert runner is not None
        drafts: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        feeds: list[list[int]] = []
        for _, session, item in rows:
            if session.kv is None:
                session.kv = runner.new_kv()
            feeds.append(session.tokens[prepare_cache(session.kv, session.tokens, self.prefix_store):])
        live = [j for j, (_, _, item) in enumerate(rows) if item.num_tokens > 0]
        while live:
            logits = self.cost.timed(runner.forward, [ForwardItem(rows[j][1].kv, feeds[j], 1) for j in live])
            for j, row_logits in zip(live, logits):
                item = rows[j][2]
                token, q = self._sample(row_logits, item, len(rows[j][1].tokens) + len(drafts[j]))
                drafts[j].append(token)
                probs[j].append(q)
                feeds[j] = [token]
            live = [j for j in live if len(drafts[j]) < rows[j][2].num_tokens]
        if self.prefix_store is not None:
            for _, session, _ in rows:  # the store keeps only the committed part of the cache
                self.prefix_store.offer(session.tokens, session.kv)
        return [
            Proposal(drafts[j], None if rows[j][2].sampling.greedy else torch.stack(probs[j]),
                     draft_pass_base_s=self.cost.base_s, draft_row_s=self.cost.row_s)
            for j in range(len(rows))
        ]

    @staticmethod
    def _sample(logits: torch.Tensor, item: ProposeItem, position: int) -> tuple[int, torch.Tensor]:
        if item.sampling.greedy:
            return int(logits[-1].argmax()), logits[-1]
        q = quantize_f16(probs_from_logits(logits[-1:], item.sampling))[0]
        return sample_index(q, uniform(item.sampling.seed, position, Purpose.DRAFT)), q
