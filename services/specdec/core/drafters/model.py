"""Drafting with a small causal LM that shares the target's tokenizer.

All sessions of a batch draft together, one batched forward pass per drafted token. Each
session's cache is rolled back to its committed tokens before it drafts again (never
rebuilt), and with a prefix store its committed chunks are shared through Redis.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from specdec.core.cost import PassCost
from specdec.core.drafters.base import DraftRow, DraftSession
from specdec.core.errors import InvalidArgument
from specdec.core.grammar import grammar_state, vocab_for_model
from specdec.core.kv_cache import SessionKV
from specdec.core.kv_fork import PrefixForks
from specdec.core.prefix_store import PrefixStore, prepare_cache
from specdec.core.processors import draft_row
from specdec.core.rng import Purpose, sample_index, uniform
from specdec.core.runner import ForwardItem, Runner
from specdec.core.sampling import probs_from_logits, quantize_f16
from specdec.core.types import Proposal, ProposeItem


class ModelDrafter:
    """`model:NAME`: the draft model held by this replica's runner."""

    kind: ClassVar[str] = "model"
    needs_model: ClassVar[bool] = True

    def __init__(self, runner: Runner, model_name: str, prefix_store: PrefixStore | None = None) -> None:
        self.runner, self.prefix_store = runner, prefix_store
        self.name = f"{self.kind}:{model_name}"
        self.cost = PassCost()  # of one draft pass: reported with each proposal
        self.forks = PrefixForks()  # new sessions copy a long prompt prefix another session holds

    @classmethod
    def create(cls, runner: Runner | None, model_name: str, prefix_store: PrefixStore | None) -> ModelDrafter | None:
        return cls(runner, model_name, prefix_store) if runner is not None else None

    def propose(self, rows: list[DraftRow]) -> list[Proposal]:
        """Draft autoregressively, all sessions batched at each of the k steps."""
        drafts: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        caches, feeds = self._feeds([session for session, _ in rows])
        live = [j for j, (_, item) in enumerate(rows) if item.num_tokens > 0]
        for session, item in rows:
            self._sync_grammar(session, item)
        while live:
            logits = self.cost.timed(self.runner.forward, [ForwardItem(caches[j], feeds[j], 1) for j in live])
            ended = set()
            for j, row_logits in zip(live, logits):
                session, item = rows[j]
                row = _processed(row_logits[-1:], session, item, drafts[j])
                if row is None:  # the grammar allows nothing more: the draft ends here
                    ended.add(j)
                    continue
                token, q = _sample(row, item, len(session.tokens) + len(drafts[j]))
                drafts[j].append(token)
                probs[j].append(q)
                feeds[j] = [token]
                if session.grammar is not None:
                    session.grammar.advance(token)
            live = [j for j in live if j not in ended and len(drafts[j]) < rows[j][1].num_tokens]
        if self.prefix_store is not None:
            for (session, _), kv in zip(rows, caches):  # the store keeps only the committed part of the cache
                self.prefix_store.offer(session.tokens, kv)
        return [
            Proposal(
                drafts[j],
                None if item.sampling.greedy or not probs[j] else torch.stack(probs[j]),
                draft_pass_base_s=self.cost.base_s,
                draft_row_s=self.cost.row_s,
            )
            for j, (_, item) in enumerate(rows)
        ]

    def _feeds(self, sessions: list[DraftSession]) -> tuple[list[SessionKV], list[list[int]]]:
        """Each session's cache, and the committed tokens it lacks after rolling it back,
        restoring a prefix or forking another session's (core/kv_fork.py). Sessions of
        this batch sharing a new prompt (n > 1 choices): the first computes it in a pass
        of its own (no logits) and the others fork it."""
        caches: list[SessionKV] = []
        for session in sessions:
            if session.kv is None:
                session.kv = self.runner.new_kv()
            prepare_cache(session.kv, session.tokens, self.prefix_store)
            caches.append(session.kv)
        held = self.forks.hold_back([(kv, s.tokens) for kv, s in zip(caches, sessions)])
        if any(held):
            first = [(kv, s.tokens) for kv, s, wait in zip(caches, sessions, held) if not wait]
            for kv, committed in first:
                self.forks.fork(kv, committed)  # from an earlier batch's session, if one holds some of it
            prefill = [ForwardItem(kv, c[kv.length : -1], 0) for kv, c in first if len(c) - 1 > kv.length]
            if prefill:  # not a timed draft pass: it would teach the cost model a prefill's time
                self.runner.forward(prefill)
        for kv, session in zip(caches, sessions):
            self.forks.fork(kv, session.tokens)
        return caches, [s.tokens[kv.length :] for kv, s in zip(caches, sessions)]

    def _sync_grammar(self, session: DraftSession, item: ProposeItem) -> None:
        """Bring a constrained session's grammar to its committed output (the drafts of the
        last proposal are rolled back here, the accepted ones consumed again)."""
        params = item.sampling
        if not params.constrained:
            session.grammar = None
            return
        vocab = vocab_for_model(self.runner.model, self.runner.vocab_size)
        output = session.tokens[params.prompt_len :]
        try:
            session.grammar = grammar_state(session.grammar, vocab, params.grammar_kind, params.grammar, output)
        except InvalidArgument:  # drafts unconstrained then: the target masks every position anyway
            session.grammar = None

    def learn(self, session: DraftSession, committed: list[int]) -> None:
        pass  # the rollback happens lazily in _feed, against the committed tokens

    def release(self, session: DraftSession) -> None:
        session.kv = None  # its slot returns to the pool


def _processed(
    logits: torch.Tensor, session: DraftSession, item: ProposeItem, drafts: list[int]
) -> torch.Tensor | None:
    """The row with the penalties and the constraint the target will apply at this
    position (better acceptance; exactness holds with any q the draft was drawn from)."""
    if not (item.sampling.penalized or item.sampling.constrained):
        return logits
    return draft_row(logits, session.tokens + drafts, item.sampling, session.grammar)


def _sample(logits: torch.Tensor, item: ProposeItem, position: int) -> tuple[int, torch.Tensor]:
    if item.sampling.greedy:
        return int(logits[-1].argmax()), logits[-1]
    q = quantize_f16(probs_from_logits(logits[-1:], item.sampling))[0]
    return sample_index(q, uniform(item.sampling.seed, position, Purpose.DRAFT)), q
