"""The target worker: one batched forward pass verifies many sessions' drafts.

A long prompt is prefilled in chunks (as vLLM's chunked prefill): each pass runs the other
sessions' steps whole and then as much of the prompt as fits the pass's time budget
(`prefill_chunk_s`, the chunk size from `PrefillCost`), so a long prompt delays everyone
else by at most about one budget a pass instead of its whole prefill. Its item is answered
`NOT_YET` and requeued by the batcher until the pass that runs its last chunk, with its
drafts, judges it; the cache holds the progress, so a requeued item is simply run again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from specdec.core.batcher import NOT_YET, NotYet
from specdec.core.checks import MAX_ITEM_DRAFT_TOKENS, check_delta, check_ids
from specdec.core.cost import DEFAULT_PREFILL_CHUNK_S, PassCost, PrefillCost
from specdec.core.errors import InvalidArgument
from specdec.core.failpoints import failpoint
from specdec.core.grammar import GrammarState, grammar_state, vocab_for_model
from specdec.core.judge import JUDGES, choose_judge
from specdec.core.kv_cache import SessionKV, SessionTable, sync_session, trim_to_tokens
from specdec.core.kv_fork import PrefixForks
from specdec.core.prefill_chunks import plan_chunks, timed_forward
from specdec.core.prefix_store import PrefixStore, prepare_cache
from specdec.core.processors import verify_rows
from specdec.core.rejection import RejectionInput, RejectionOutput
from specdec.core.runner import ForwardItem, Runner
from specdec.core.transfer import to_device_split, to_host
from specdec.core.types import TokenLogprob, Verdict, VerifyItem


@dataclass
class TargetSession:
    tokens: list[int] = field(default_factory=list)  # committed tokens
    kv: SessionKV | None = None  # holds KV of tokens[:-1] between steps, never an uncommitted one
    grammar: GrammarState | None = None  # the structured-output constraint's state (replayable from tokens)


@dataclass
class TargetStats:
    """Running totals: the tier's load figures (rates per interval) and tests read them."""

    forward_passes: int = 0
    max_batch_size: int = 0
    draft_tokens: int = 0  # drafts judged
    accepted_tokens: int = 0  # drafts kept
    committed_tokens: int = 0  # tokens committed (accepted drafts + the target's own)
    prefill_tokens: int = 0  # prompt (context) rows computed: fed without asking for their logits
    forked_tokens: int = 0  # prompt rows copied from another session's cache instead (core/kv_fork.py)


class TargetWorker:
    """Verifies drafts against the target model. Not thread-safe: one batch at a time."""

    def __init__(
        self,
        runner: Runner,
        max_sessions: int = 1024,
        prefix_store: PrefixStore | None = None,
        max_cached_tokens: int | None = None,
        max_idle_s: float = 600.0,
        prefill_chunk_s: float = DEFAULT_PREFILL_CHUNK_S,
        prefill_chunk_tokens: int = 0,
        judge: str | None = None,
    ) -> None:
        # A pass's time budget for prefill chunks (0 with no fixed chunk: a prompt in one
        # pass); a fixed chunk size instead of the budget's (tests force small ones).
        self.prefill_chunk_s, self.prefill_chunk_tokens = prefill_chunk_s, prefill_chunk_tokens
        self.prefill_cost = PrefillCost()
        self.max_idle_s = max_idle_s  # a session unused this long is dropped (its caller is gone)
        self.runner = runner
        self.max_cached_tokens = max_cached_tokens  # memory budget of the session caches (None: count only)
        self.prefix_store = prefix_store  # shared KV chunks (e.g. Redis): restore prefixes, offer new ones
        self.sessions: SessionTable[TargetSession] = SessionTable(max_sessions)
        self.stats = TargetStats()
        self.forks = PrefixForks()  # new sessions copy a long prompt prefix another session holds
        self.cost = PassCost()
        # "batched" or "per_item" (core/judge.py); None: the faster here, measured once.
        device = getattr(runner, "device", "cpu")
        self.judge = JUDGES[judge or choose_judge(runner.vocab_size, device)]

    def release(self, session_id: str) -> None:
        self.sessions.pop(session_id)

    def verify_batch(self, items: list[VerifyItem]) -> list[Verdict | InvalidArgument | NotYet]:
        """One verdict per item, in order; a bad item gets its own InvalidArgument and the
        rest of the batch is verified as if it had not been there. A prefill that did not
        finish in this pass gets NOT_YET (the batcher runs it again in the next)."""
        failpoint("verify_batch")
        verdicts: list[Verdict | InvalidArgument | NotYet | None] = [None] * len(items)
        work: list[tuple[int, TargetSession, VerifyItem]] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            try:
                check_item(item, self.runner.vocab_size, self.runner.max_context)
            except InvalidArgument as exc:
                verdicts[i] = exc
                continue
            if item.session_id in seen:  # a session's second step in one pass: after its first
                verdicts[i] = NOT_YET
                continue
            seen.add(item.session_id)
            if item.draft_parents is not None and not getattr(self.runner, "supports_trees", False):
                item = chain_of(item)
            session = self._sync(item)
            if session is None:
                verdicts[i] = Verdict(needs_resync=True)
            else:
                work.append((i, session, item))
        self.sessions.drop_idle(self.max_idle_s)
        if self.max_cached_tokens is not None:
            trim_to_tokens(self.sessions, self.max_cached_tokens, {item.session_id for item in items})
        held = self.forks.hold_back([(session.kv, session.tokens) for _, session, _ in work])
        for (i, _, _), wait in zip(work, held):  # a sibling computes their prompt now: fork it next pass
            verdicts[i] = NOT_YET if wait else verdicts[i]
        work = [w for w, wait in zip(work, held) if not wait]
        if work:
            planned = self._chunked([self._forward_item(session, item) for _, session, item in work])
            run = [(w, f) for w, f in zip(work, planned) if f is not None]
            logits = self._timed_forward([f for _, f in run])
            self.stats.prefill_tokens += sum(len(f.tokens) - f.num_logits for _, f in run)
            self._count(len(run))
            judged: list[tuple[int, TargetSession, VerifyItem, torch.Tensor]] = []
            for ((i, session, item), f), row_logits in zip(run, logits):
                if f.num_logits:
                    judged.append((i, session, item, row_logits))
                elif self.prefix_store is not None:  # a chunk: share the prefix computed so far
                    self.prefix_store.offer(session.tokens, f.kv)
            for (i, *_), verdict in zip(judged, self._judge_batch([j[1:] for j in judged], len(run))):
                verdicts[i] = verdict
            for i, _, _ in work:
                verdicts[i] = NOT_YET if verdicts[i] is None else verdicts[i]
        return [v for v in verdicts if v is not None]

    def _chunked(self, full: list[ForwardItem]) -> list[ForwardItem | None]:
        """What each item runs in this pass (core/prefill_chunks.py): steps whole, a prefill
        as its next chunk, or None when earlier prefills took this pass's budget."""
        return plan_chunks(full, self.prefill_chunk_s, self.prefill_chunk_tokens, self.cost, self.prefill_cost)

    def _timed_forward(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        return timed_forward(self.runner.forward, items, self.cost, self.prefill_cost)

    def _sync(self, item: VerifyItem) -> TargetSession | None:
        return sync_session(
            self.sessions, item.session_id, item.prefix_len, item.tokens, lambda: TargetSession(kv=self.runner.new_kv())
        )

    def _forward_item(self, session: TargetSession, item: VerifyItem) -> ForwardItem:
        kv = session.kv
        assert kv is not None
        self.stats.forked_tokens += prepare_cache(kv, session.tokens, self.prefix_store, self.forks)
        fed = session.tokens[kv.length :]
        parents = None
        if item.draft_parents is not None:  # the committed tokens as a chain, the tree after the newest
            parents = [*range(-1, len(fed) - 1), *(len(fed) - 1 if p < 0 else len(fed) + p for p in item.draft_parents)]
        return ForwardItem(kv, fed + item.draft_tokens, len(item.draft_tokens) + 1, parents)

    def _judge_batch(
        self, judged: list[tuple[TargetSession, VerifyItem, torch.Tensor]], batch_size: int
    ) -> list[Verdict]:
        """The verdicts of the items whose drafts this pass scored. With the batched judge
        (an accelerator's), the device is read back a constant number of times for the whole
        batch (core/transfer.py): once for the verdicts, once more for the log-probabilities
        when some item asks for them. Penalties and a constraint process their item's rows
        first, item by item."""
        inputs = [
            RejectionInput(
                *self._processed(session, item, logits), item.sampling, len(session.tokens), item.draft_parents
            )
            for session, item, logits in judged
        ]
        outs = self.judge(inputs)
        asked = [
            (logits if out.path is None else logits[out.rows()], out.tokens, item.logprobs)
            for (_, item, logits), out in zip(judged, outs)
            if item.logprobs >= 0
        ]
        logprobs = iter(batch_token_logprobs(asked))
        return [
            self._commit(session, item, out, next(logprobs) if item.logprobs >= 0 else [], batch_size)
            for (session, item, _), out in zip(judged, outs)
        ]

    def _commit(
        self,
        session: TargetSession,
        item: VerifyItem,
        out: RejectionOutput,
        logprobs: list[TokenLogprob],
        batch_size: int,
    ) -> Verdict:
        assert session.kv is not None
        if out.path is not None:  # a tree: its rows sit after the committed ones, node by node
            session.kv.keep_path(len(session.tokens), out.path)
        session.tokens.extend(out.tokens)
        self.stats.draft_tokens += len(item.draft_tokens)
        self.stats.accepted_tokens += out.num_accepted
        self.stats.committed_tokens += len(out.tokens)
        assert session.kv is not None
        # Roll back the rejected drafts: keep committed tokens only (all but the newest).
        session.kv.truncate(len(session.tokens) - 1)
        if self.prefix_store is not None:
            self.prefix_store.offer(session.tokens, session.kv)
        return Verdict(
            out.num_accepted,
            out.tokens,
            batch_size,
            pass_base_s=self.cost.base_s,
            row_s=self.cost.row_s,
            logprobs=logprobs,
        )

    def _processed(
        self, session: TargetSession, item: VerifyItem, logits: torch.Tensor
    ) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """The rows as the request's penalties and constraint see them, each after its own
        history (accepted drafts included); untouched (no copy) for a plain request."""
        params = item.sampling
        if not (params.penalized or params.constrained):
            return logits, item.draft_tokens, item.draft_probs
        if params.constrained:
            vocab = vocab_for_model(self.runner.model, self.runner.vocab_size)
            output = session.tokens[params.prompt_len :]
            session.grammar = grammar_state(session.grammar, vocab, params.grammar_kind, params.grammar, output)
        else:
            session.grammar = None
        grammar = session.grammar
        return verify_rows(logits, session.tokens, item.draft_tokens, item.draft_probs, params, grammar)

    def _count(self, batch_size: int) -> None:
        self.stats.forward_passes += 1
        self.stats.max_batch_size = max(self.stats.max_batch_size, batch_size)


MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's cap)


def batch_token_logprobs(wanted: list[tuple[torch.Tensor, list[int], int]]) -> list[list[TokenLogprob]]:
    """Each committed token's log-probability from the logits row that predicted it (row i
    for token i: accepted drafts and the target's own token alike), with the `top` most
    likely alternatives, for many (logits, tokens, top) at once, read back in one copy.
    Raw: before temperature / top-k / top-p. In float64, so the value does not depend on
    how many rows shared the pass beyond the logits' own rounding; topk runs once per
    distinct `top` (ties come out as a per-item topk gives them)."""
    if not wanted:
        return []
    device = wanted[0][0].device
    (tokens,) = to_device_split([[t for _, toks, _ in wanted for t in toks]], torch.int64, device)
    rows = torch.log_softmax(torch.cat([lg[: len(toks)].to(torch.float64) for lg, toks, _ in wanted]), dim=-1)
    row_of = [r for r, (_, toks, _) in enumerate(wanted) for _ in toks]  # item of each row
    parts = [rows[torch.arange(len(row_of), device=device), tokens]]
    tops = sorted({min(top, rows.shape[-1]) for _, _, top in wanted if top > 0})
    for top in tops:
        values, ids = rows.topk(top, dim=-1)
        parts += [values.flatten(), ids.flatten().to(torch.float64)]  # ids < 2**53: exact
    flat = to_host(torch.cat(parts)).tolist()
    n = len(row_of)
    chosen, base = flat[:n], n
    tables: dict[int, list[list[tuple[int, float]]]] = {}
    for top in tops:  # per top: n x top values, then n x top ids
        vals, idx = flat[base : base + n * top], flat[base + n * top : base + 2 * n * top]
        tables[top] = [[(int(idx[i]), vals[i]) for i in range(r * top, (r + 1) * top)] for r in range(n)]
        base += 2 * n * top
    out: list[list[TokenLogprob]] = [[] for _ in wanted]
    for r, item in enumerate(row_of):
        top = min(wanted[item][2], rows.shape[-1])
        out[item].append(TokenLogprob(chosen[r], tables[top][r]) if top > 0 else TokenLogprob(chosen[r]))
    return out


def check_item(item: VerifyItem, vocab_size: int, max_context: int) -> None:
    """Whatever arrives is checked as if a stranger sent it: a bad item must fail alone,
    and draft probabilities that are not a distribution would break exactness (a NaN q
    accepts any draft). Fields are named as in target.proto's VerifyItem."""
    check_delta(item.prefix_len, item.sampling, vocab_size)
    if item.prefix_len == 0 and not item.tokens:
        raise InvalidArgument("tokens", "a new session needs at least one committed token")
    if not -1 <= item.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {item.logprobs}")
    if item.sampling.prompt_len > item.prefix_len + len(item.tokens):
        raise InvalidArgument("sampling.prompt_len", "longer than the session's committed tokens")
    if len(item.draft_tokens) > MAX_ITEM_DRAFT_TOKENS:
        raise InvalidArgument("draft_tokens", f"at most {MAX_ITEM_DRAFT_TOKENS}, got {len(item.draft_tokens)}")
    if item.prefix_len + len(item.tokens) + len(item.draft_tokens) >= max_context:
        raise InvalidArgument("tokens", f"the session would exceed the model's context of {max_context}")
    check_ids("tokens", item.tokens, vocab_size)
    check_ids("draft_tokens", item.draft_tokens, vocab_size)
    if item.draft_probs is not None:
        _check_probs(item.draft_probs, item.draft_tokens, vocab_size)
    if item.draft_parents is not None:
        _check_tree(item)


def _check_tree(item: VerifyItem) -> None:
    parents = item.draft_parents
    assert parents is not None
    if len(parents) != len(item.draft_tokens):
        raise InvalidArgument("draft_parents", f"{len(parents)} parents for {len(item.draft_tokens)} draft tokens")
    if any(not -1 <= p < i for i, p in enumerate(parents)):
        raise InvalidArgument("draft_parents", "each must be -1 (the root) or the index of an earlier draft token")
    params = item.sampling
    if params.penalized or params.constrained or item.draft_probs is not None:
        # Penalties and grammars see each row's own history, which differs per branch.
        raise InvalidArgument(
            "draft_parents", "token trees are verified with one-hot drafts, no penalty, no constraint"
        )


def chain_of(item: VerifyItem) -> VerifyItem:
    """The tree's first path (each node's first child) as a chain: for a runner that
    cannot verify trees. Exact all the same; it only drafts less."""
    assert item.draft_parents is not None
    chain: list[int] = []
    for i, parent in enumerate(item.draft_parents):
        if parent == (chain[-1] if chain else -1):
            chain.append(i)
    return dataclasses.replace(item, draft_tokens=[item.draft_tokens[i] for i in chain], draft_parents=None)


def _check_probs(q: torch.Tensor, draft: list[int], vocab_size: int) -> None:
    if tuple(q.shape) != (len(draft), vocab_size):
        raise InvalidArgument("draft_probs_f16", f"shape {tuple(q.shape)}, want [{len(draft)}, {vocab_size}]")
    # Two passes over k x vocab: min() propagates a NaN (and fails >= 0); with no negative
    # entry, an infinite one makes its row's sum infinite.
    ones = torch.ones(len(draft), dtype=q.dtype, device=q.device)
    if not bool(q.min() >= 0) or not torch.allclose(q.sum(dim=-1), ones, atol=1e-3):
        raise InvalidArgument("draft_probs_f16", "probabilities must be finite, non-negative, each row summing to 1")
