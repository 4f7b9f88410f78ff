"""Drafting with a small causal LM that shares the target's tokenizer.

All sessions of a batch draft together, one batched forward pass per drafted token. Each
session's cache is rolled back to its committed tokens before it drafts again (never
rebuilt), and with a prefix store its committed chunks are shared through Redis. A long
prompt is prefilled in chunks, as at the target (core/prefill_chunks.py).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from specdec.core.batcher import NOT_YET, NotYet
from specdec.core.cost import DEFAULT_PREFILL_CHUNK_S, PassCost, PrefillCost
from specdec.core.drafters.base import DraftRow, DraftSession
from specdec.core.errors import InvalidArgument
from specdec.core.grammar import grammar_state, vocab_for_model
from specdec.core.kv_cache import SessionKV
from specdec.core.kv_fork import PrefixForks
from specdec.core.prefill_chunks import plan_chunks, timed_forward
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
        # A pass's time budget for prompt chunks (SPECDEC_PREFILL_CHUNK_S; 0 with no fixed
        # chunk: a prompt in one pass), or a fixed chunk size (tests force small ones).
        self.prefill_chunk_s, self.prefill_chunk_tokens = DEFAULT_PREFILL_CHUNK_S, 0
        self.prefill_cost = PrefillCost()

    @classmethod
    def create(cls, runner: Runner | None, model_name: str, prefix_store: PrefixStore | None) -> ModelDrafter | None:
        return cls(runner, model_name, prefix_store) if runner is not None else None

    def propose(self, rows: list[DraftRow]) -> list[Proposal | NotYet]:
        """Draft autoregressively, all sessions batched at each of the k steps. A row whose
        prompt is still being prefilled (a chunk ran, or none fit this pass) or that waits
        for a sibling computing its prompt (core/kv_fork.py) gets NOT_YET: the batcher runs
        it again next pass, its cache holding the progress."""
        drafts: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        caches, feeds, live = self._feeds(rows)
        logits = self._first_pass(caches, feeds, live)
        drafting = live = list(logits)
        for j in live:
            self._sync_grammar(*rows[j])
        while live:
            ended = set()
            for j in live:
                session, item = rows[j]
                row = _processed(logits[j][-1:], session, item, drafts[j])
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
            if live:
                passed = self.cost.timed(self.runner.forward, [ForwardItem(caches[j], feeds[j], 1) for j in live])
                logits = dict(zip(live, passed))
        if self.prefix_store is not None:
            for (session, _), kv in zip(rows, caches):  # the store keeps only the committed part of the cache
                self.prefix_store.offer(session.tokens, kv)
        done = set(drafting) | {j for j, (_, item) in enumerate(rows) if item.num_tokens == 0}
        return [
            Proposal(
                drafts[j],
                None if item.sampling.greedy or not probs[j] else torch.stack(probs[j]),
                draft_pass_base_s=self.cost.base_s,
                draft_row_s=self.cost.row_s,
            )
            if j in done
            else NOT_YET
            for j, (_, item) in enumerate(rows)
        ]

    def _feeds(self, rows: list[DraftRow]) -> tuple[list[SessionKV], list[list[int]], list[int]]:
        """Each session's cache, the committed tokens it lacks after rolling it back,
        restoring a prefix or forking another session's (core/kv_fork.py), and the rows to
        run: those asking for drafts, but for sessions of this batch sharing a new prompt
        (n > 1 choices) with an earlier row, which computes it; they fork it next pass."""
        caches: list[SessionKV] = []
        for session, _ in rows:
            if session.kv is None:
                session.kv = self.runner.new_kv()
            prepare_cache(session.kv, session.tokens, self.prefix_store)
            caches.append(session.kv)
        asking = [j for j, (_, item) in enumerate(rows) if item.num_tokens > 0]
        held = self.forks.hold_back([(caches[j], rows[j][0].tokens) for j in asking])
        live = [j for j, wait in zip(asking, held) if not wait]
        for j in live:
            self.forks.fork(caches[j], rows[j][0].tokens)
        return caches, [session.tokens[kv.length :] for kv, (session, _) in zip(caches, rows)], live

    def _first_pass(self, caches: list[SessionKV], feeds: list[list[int]], live: list[int]) -> dict[int, torch.Tensor]:
        """The first draft pass: steps whole, a long prompt as its next chunk
        (core/prefill_chunks.py) so that it delays the other sessions by about one budget.
        The logits of the rows that draft now, by row."""
        full = [ForwardItem(caches[j], feeds[j], 1) for j in live]
        planned = plan_chunks(full, self.prefill_chunk_s, self.prefill_chunk_tokens, self.cost, self.prefill_cost)
        run = [(j, f) for j, f in zip(live, planned) if f is not None]
        if not run:
            return {}
        passed = timed_forward(self.runner.forward, [f for _, f in run], self.cost, self.prefill_cost)
        return {j: row_logits for (j, f), row_logits in zip(run, passed) if f.num_logits}

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
