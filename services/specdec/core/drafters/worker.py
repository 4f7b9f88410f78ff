"""The draft worker: per-session drafting state and batched proposals for every drafter
that one draft replica serves."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from specdec.core.batcher import NOT_YET, NotYet
from specdec.core.checks import MAX_ITEM_DRAFT_TOKENS, check_delta, check_ids
from specdec.core.cost import DEFAULT_PREFILL_CHUNK_S
from specdec.core.drafters.base import DraftMethod, DraftRow, DraftSession
from specdec.core.drafters.forced import propose_guided
from specdec.core.drafters.model import ModelDrafter
from specdec.core.drafters.registry import build_methods
from specdec.core.errors import InvalidArgument
from specdec.core.grammar import vocab_for_model
from specdec.core.kv_cache import SessionTable, sync_session, trim_to_tokens
from specdec.core.prefix_store import PrefixStore
from specdec.core.runner import Runner
from specdec.core.types import Proposal, ProposeItem

log = logging.getLogger(__name__)


class DraftWorker:
    """Serves every registered drafter that can run on this replica: the model-free ones
    always, a model drafter given a runner. Not thread-safe: one batch at a time (the
    batcher guarantees it)."""

    def __init__(
        self,
        runner: Runner | None = None,
        model_name: str = "",
        max_sessions: int = 1024,
        prefix_store: PrefixStore | None = None,
        max_cached_tokens: int | None = None,
        max_idle_s: float = 600.0,
        prefill_chunk_s: float = DEFAULT_PREFILL_CHUNK_S,
        prefill_chunk_tokens: int = 0,
        grammar_vocab: Callable[[], Any] | None = None,
    ) -> None:
        self.max_idle_s = max_idle_s  # a session unused this long is dropped (its caller is gone)
        self.max_cached_tokens = max_cached_tokens  # memory budget of the session states (None: count only)
        self.methods: dict[str, DraftMethod] = {m.name: m for m in build_methods(runner, model_name, prefix_store)}
        for method in self.methods.values():
            if isinstance(method, ModelDrafter):  # prefills long prompts in chunks (SPECDEC_PREFILL_CHUNK_S)
                method.prefill_chunk_s, method.prefill_chunk_tokens = prefill_chunk_s, prefill_chunk_tokens
        self.vocab_size = runner.vocab_size if runner is not None else None  # None: any id (model-free only)
        self.prefix_store = prefix_store  # shared draft-model KV chunks (e.g. Redis)
        self.sessions: SessionTable[DraftSession] = SessionTable(max_sessions)
        self.drafted_tokens = 0  # running total, for the tier's load figures
        # The model-free drafters draft constrained requests under their grammar
        # (drafters/forced.py); False drafts them blind (benchmarks compare the two).
        self.grammar_drafts = True
        # Their grammar vocabulary, loaded at the first constrained request: the draft
        # model's, else `grammar_vocab()` (the target's tokenizer), else none (drafted blind).
        if grammar_vocab is None and runner is not None:
            grammar_vocab = lambda: vocab_for_model(runner.model, runner.vocab_size)
        self._vocab_loader = grammar_vocab
        self._vocab: Any = None

    @property
    def drafters(self) -> list[str]:
        return list(self.methods)

    def release(self, session_id: str) -> None:
        session = self.sessions.pop(session_id)
        if session is not None:
            for method in self.methods.values():
                method.release(session)

    def propose_batch(self, items: list[ProposeItem]) -> list[Proposal | InvalidArgument | NotYet]:
        """One proposal per item, in order; a bad item gets its own InvalidArgument, and a
        session's second item in one batch NOT_YET (it runs after the first), as does an
        item whose prompt the model drafter is still prefilling in chunks."""
        results: list[Proposal | InvalidArgument | NotYet] = [Proposal(needs_resync=True)] * len(items)
        groups: dict[str, list[tuple[int, DraftRow]]] = {}
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.session_id in seen:
                results[i] = NOT_YET
                continue
            seen.add(item.session_id)
            method = self.methods.get(item.drafter)
            if method is None:
                results[i] = InvalidArgument(
                    "drafter", f"this replica serves {self.drafters}, not {item.drafter[:100]!r}"
                )
                continue
            try:
                check_item(item, self.vocab_size)
            except InvalidArgument as exc:
                results[i] = exc
                continue
            session = self._sync(item, method)
            if session is not None:
                groups.setdefault(item.drafter, []).append((i, (session, item)))
        self.sessions.drop_idle(self.max_idle_s)
        if self.max_cached_tokens is not None:
            trim_to_tokens(self.sessions, self.max_cached_tokens, {item.session_id for item in items})
        for name, rows in groups.items():
            for (i, _), proposal in zip(rows, self._propose(self.methods[name], [row for _, row in rows])):
                results[i] = proposal
        self.drafted_tokens += sum(len(p.tokens) for p in results if isinstance(p, Proposal))
        return results

    def _propose(self, method: DraftMethod, rows: list[DraftRow]) -> Sequence[Proposal | NotYet]:
        """A model drafter masks its own rows; the model-free ones draft constrained
        requests through drafters/forced.py."""
        if method.needs_model or not self.grammar_drafts or not any(item.sampling.constrained for _, item in rows):
            return method.propose(rows)
        vocab = self.grammar_vocab()
        return method.propose(rows) if vocab is None else propose_guided(method, rows, vocab)

    def grammar_vocab(self) -> Any:
        """The model-free drafters' grammar vocabulary, loaded once (None: there is none)."""
        if self._vocab_loader is not None:
            loader, self._vocab_loader = self._vocab_loader, None
            try:
                self._vocab = loader()
            except Exception:  # no tokenizer here: constrained drafts stay blind, still exact
                log.warning("no grammar vocabulary for the model-free drafters", exc_info=True)
        return self._vocab

    def _sync(self, item: ProposeItem, method: DraftMethod) -> DraftSession | None:
        session = sync_session(self.sessions, item.session_id, item.prefix_len, item.tokens, DraftSession)
        if session is not None and item.tokens:
            method.learn(session, item.tokens)
        return session


def check_item(item: ProposeItem, vocab_size: int | None) -> None:
    """Checked as if a stranger sent it; fields named as in draft.proto's ProposeItem."""
    check_delta(item.prefix_len, item.sampling, vocab_size)
    if not 0 <= item.num_tokens <= MAX_ITEM_DRAFT_TOKENS:
        raise InvalidArgument("num_tokens", f"must be in [0, {MAX_ITEM_DRAFT_TOKENS}], got {item.num_tokens}")
    if vocab_size is not None:
        check_ids("tokens", item.tokens, vocab_size)
