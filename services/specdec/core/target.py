"""The target worker: one batched forward pass verifies many sessions' drafts."""
from __future__ import annotations

from dataclasses import dataclass, field

from specdec.core.cost import PassCost
from specdec.core.kv_cache import SessionKV, SessionTable, sync_session
from specdec.core.prefix_store import PrefixStore, prepare_cache
from specdec.core.rejection import RejectionInput, rejection_sample
from specdec.core.runner import ForwardItem, Runner
from specdec.core.types import Verdict, VerifyItem


@dataclass
class TargetSession:
    tokens: list[int] = field(default_factory=list)  # committed tokens
    kv: SessionKV | None = None  # holds KV of tokens[:-1] between steps, never an uncommitted one


@dataclass
class TargetStats:
    """Running totals: the tier's load figures (rates per interval) and tests read them."""

    forward_passes: int = 0
    max_batch_size: int = 0
    draft_tokens: int = 0  # drafts judged
    accepted_tokens: int = 0  # drafts kept
    committed_tokens: int = 0  # tokens committed (accepted drafts + the target's own)


class TargetWorker:
    """Verifies drafts against the target model. Not thread-safe: one batch at a time."""

    def __init__(self, runner: Runner, max_sessions: int = 1024, prefix_store: PrefixStore | None = None) -> None:
        self.runner = runner
        self.prefix_store = prefix_store  # shared KV chunks (e.g. Redis): restore prefixes, offer new ones
        self.sessions = SessionTable(max_sessions)
        self.stats = TargetStats()
        self.cost = PassCost()

    def release(self, session_id: str) -> None:
        self.sessions.pop(session_id)

    def verify_batch(self, items: list[VerifyItem]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(items)
        work: list[tuple[int, TargetSession, VerifyItem]] = []
        for i, item in enumerate(items):
            session = self._sync(item)
            if session is None:
                verdicts[i] = Verdict(needs_resync=True)
            else:
                work.append((i, session, item))
        if work:
            forward_items = [self._forward_item(session, item) for _, session, item in work]
            logits = self.cost.timed(self.runner.forward, forward_items)
            self._count(len(forward_items))
            for (i, session, item), row_logits in zip(work, logits):
                verdicts[i] = self._judge(session, item, row_logits, len(work))
        return [v for v in verdicts if v is not None]

    def _sync(self, item: VerifyItem) -> TargetSession | None:
        session = sync_session(self.sessions, item.session_id, item.prefix_len, item.tokens,
                               lambda: TargetSession(kv=self.runner.new_kv()))
        if session is None:
            return None
        if not session.tokens:
            raise ValueError(f"session {item.session_id}: nothing to verify (no committed tokens)")
        return session

    def _forward_item(self, session: TargetSession, item: VerifyItem) -> ForwardItem:
        kv = session.kv
        assert kv is not None
        keep = prepare_cache(kv, session.tokens, self.prefix_store)
        feed = session.tokens[keep:] + item.draft_tokens
        return ForwardItem(kv, feed, len(item.draft_tokens) + 1)

    def _judge(self, session: TargetSession, item: VerifyItem, logits, batch_size: int) -> Verdict:
        committed = len(session.tokens)
        out = rejection_sample(RejectionInput(
            target_logits=logits, draft_tokens=item.draft_tokens, draft_probs=item.draft_probs,
            sampling=item.sampling, first_position=committed,
        ))
        session.tokens.extend(out.tokens)
        self.stats.draft_tokens += len(item.draft_tokens)
        self.stats.accepted_tokens += out.num_accepted
        self.stats.committed_tokens += len(out.tokens)
        assert session.kv is not None
        # Roll back the rejected drafts: keep committed tokens only (all but the newest).
        session.kv.truncate(len(session.tokens) - 1)
        if self.prefix_store is not None:
            self.prefix_store.offer(session.tokens, session.kv)
        return Verdict(out.num_accepted, out.tokens, batch_size, pass_base_s=self.cost.base_s, row_s=self.cost.row_s)

    def _count(self, batch_size: int) -> None:
        self.stats.forward_passes += 1
        self.stats.max_batch_size = max(self.stats.max_batch_size, batch_size)
