"""Model-free drafting from suffix structures (SuffixDecoding, arXiv 2411.04975).

Two token streams are indexed: each session's own tokens (prompt and output so far) and a
bounded shared stream holding the recent outputs of the other sessions this replica
served. For the session's context the drafter finds the longest suffix (up to `max_match`
tokens) that occurred earlier in a stream, then follows the continuation seen most often
after those occurrences, token by token, while the product of the continuation
frequencies (the chance the draft is still right) stays at or above `min_prob`. A draft is
also capped at `spec_factor` times the match length, so a one-token match proposes two
tokens and a long match up to the k asked for. Of the two streams' drafts, the one with
the higher score (the expected number of accepted tokens: the sum of those products)
is proposed.

The index: at each position the window of the last `a` tokens, for each anchor length `a`
in ANCHORS, is keyed; a dict maps a key to its latest end position and an array chains
each position to the previous one with the same key. Appending or removing a token costs
len(ANCHORS) dict operations; a lookup walks at most `max_candidates` chain links and
compares at most `max_match` tokens per candidate. Nothing depends on the context length.

For a request without penalties or a constraint the drafter proposes a token *tree*
instead of one continuation: best-first, the most probable continuations by those
frequency products, up to the k asked for (the node budget the draft-length controller
picks, as it picks a chain's length), so where earlier occurrences went different ways
the target checks several of them in one pass (`ForwardItem.parents`). `suffix-chain`
proposes the single most frequent continuation, as before trees. Greedy requests walk the
tree to the longest path the target agrees with; sampled ones by SpecInfer's multi-step
speculative sampling (core/rejection.py), exact as a chain is.

Deterministic, so the draft distribution is one-hot (Proposal.probs None) as for the
n-gram drafter. Sampled requests draft from their own tokens only: under a fixed seed a
sampled output depends on the drafts, and so stays the same whatever else this process
served. Greedy requests, whose output no draft can change, also draw on the shared stream.
"""

from __future__ import annotations

import heapq
import itertools
import weakref
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from specdec.core.types import Proposal

if TYPE_CHECKING:
    from specdec.core.drafters.base import DraftRow, DraftSession
    from specdec.core.prefix_store import PrefixStore
    from specdec.core.runner import Runner
    from specdec.core.types import ProposeItem

ANCHORS = (1, 3, 8)  # window lengths keyed at each position; a lookup tries the longest first
SEPARATOR = -1  # between sequences of the shared stream, and outside a stream: equals no token
NO_KEY = -1  # a position without a window of that length (hash() never returns -1, ids are >= 0)


def _key(window: Sequence[int]) -> int:
    # In-process only (never stored or sent), so Python's hash of a tuple of ints will do;
    # a collision costs a candidate that the token comparison in `match` then drops.
    return window[0] if len(window) == 1 else hash(tuple(window))


class SuffixIndex:
    """A token stream whose windows are keyed for lookup. Unbounded and truncatable (a
    session's tokens) or a ring of the last `capacity` tokens (the shared stream). Positions
    are absolute: 0 for the first token ever appended."""

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity <= max(ANCHORS):
            raise ValueError(f"capacity must exceed {max(ANCHORS)}, got {capacity}")
        self.capacity = capacity
        self.length = 0  # tokens ever appended
        self.start = 0  # the oldest position still held (a ring forgets older ones)
        size = capacity or 0
        self._tokens: list[int] = [SEPARATOR] * size
        self._heads: list[dict[int, int]] = [{} for _ in ANCHORS]  # key -> latest end position
        self._prev = [array("q", [-1]) * size for _ in ANCHORS]  # slot -> previous end with its key, -1 none
        self._keys = [array("q", [NO_KEY]) * size for _ in ANCHORS]  # slot -> its key, to unlink it later

    def __len__(self) -> int:
        return self.length - self.start

    def _slot(self, position: int) -> int:
        return position if self.capacity is None else position % self.capacity

    def token_at(self, position: int) -> int:
        """The token at `position`; SEPARATOR outside the positions held."""
        if position < self.start or position >= self.length:
            return SEPARATOR
        return self._tokens[self._slot(position)]

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        position = self.length
        if self.capacity is None:
            self._tokens.append(token)
            for prev, keys in zip(self._prev, self._keys):
                prev.append(-1)
                keys.append(NO_KEY)
        else:
            if position >= self.capacity:
                self._unlink_oldest(position - self.capacity)
            self._tokens[position % self.capacity] = token
        self.length += 1
        slot = self._slot(position)
        if self.capacity is None:
            tail = self._tokens[-max(ANCHORS) :]
        else:
            tail = [self.token_at(p) for p in range(position - max(ANCHORS) + 1, position + 1)]
        for i, anchor in enumerate(ANCHORS):
            window = tail[-anchor:]
            if position < anchor - 1 or SEPARATOR in window:
                self._keys[i][slot] = NO_KEY  # a ring slot may hold an evicted position's key
                continue
            key = _key(window)
            self._prev[i][slot] = self._heads[i].get(key, -1)
            self._keys[i][slot] = key
            self._heads[i][key] = position

    def _unlink_oldest(self, position: int) -> None:
        """Forget the ring's oldest position; chains through it end there (they stop below `start`)."""
        slot = self._slot(position)
        for heads, keys in zip(self._heads, self._keys):
            key = keys[slot]
            if key != NO_KEY and heads.get(key) == position:
                del heads[key]  # its latest occurrence is the oldest held: every occurrence is gone
        self.start = position + 1

    def truncate(self, length: int) -> None:
        """Drop the positions from `length` on (tokens that were not committed after all)."""
        assert self.capacity is None, "only an unbounded stream is truncated"
        for position in range(self.length - 1, length - 1, -1):
            for heads, prev, keys in zip(self._heads, self._prev, self._keys):
                key = keys[position]
                if key == NO_KEY:
                    continue
                if prev[position] >= 0:
                    heads[key] = prev[position]  # the latest occurrence is always the one removed
                else:
                    del heads[key]
        del self._tokens[length:]
        for arr in (*self._prev, *self._keys):
            del arr[length:]
        self.length = min(self.length, length)

    def match(
        self, context: Sequence[int], max_match: int, max_candidates: int, exclude: int = -1
    ) -> tuple[int, list[int]]:
        """The longest match of `context`'s suffix (up to `max_match` tokens) among the most
        recent `max_candidates` occurrences of its longest window found, and the end
        positions of the occurrences that match that long, newest first; (0, []) for none.
        `exclude` is a position not to use (the context's own end, in its own stream)."""
        for i in reversed(range(len(ANCHORS))):
            anchor = ANCHORS[i]
            if len(context) < anchor:
                continue
            position, found = self._heads[i].get(_key(context[-anchor:]), -1), []
            for _ in range(max_candidates):
                if position < self.start:
                    break
                if position != exclude:
                    found.append(position)
                position = self._prev[i][self._slot(position)]
            length, ends = self._longest(context, found, max_match)
            # Shorter than the window: it began before the ring's oldest token (or its key
            # collided), and the shorter anchors' candidates may match as long.
            if length >= anchor:
                return length, ends
        return 0, []

    def _longest(self, context: Sequence[int], found: list[int], max_match: int) -> tuple[int, list[int]]:
        best, chosen = 0, []
        n = len(context)
        limit = min(max_match, n)
        tail = list(context[n - limit :])
        for end in found:
            if self.capacity is None and end + 1 >= limit and self._tokens[end + 1 - limit : end + 1] == tail:
                length = limit  # the whole window at once: the common case in repetitive text
            else:
                length = 0
                while length < limit and self.token_at(end - length) == context[n - 1 - length]:
                    length += 1
            if length > best:
                best, chosen = length, [end]
            elif length == best and length > 0:
                chosen.append(end)
        return best, chosen

    def follow(self, ends: list[int], max_tokens: int, min_prob: float) -> tuple[list[int], float]:
        """The continuation seen most often after the occurrences ending at `ends` (newest
        first; a tie goes to the newest), token by token while the product of the chosen
        tokens' frequencies stays >= `min_prob`; with its score, the sum of those products."""
        draft: list[int] = []
        prob, score = 1.0, 0.0
        live = ends
        for step in range(1, max_tokens + 1):
            nexts = [(end, self.token_at(end + step)) for end in live]
            counts: dict[int, int] = {}
            for _, token in nexts:
                if token != SEPARATOR:
                    counts[token] = counts.get(token, 0) + 1
            if not counts:
                break
            best = max(counts, key=counts.__getitem__)  # the first of the most frequent: the newest
            prob *= counts[best] / sum(counts.values())
            if prob < min_prob:
                break
            draft.append(best)
            score += prob
            live = [end for end, token in nexts if token == best]
        return draft, score

    def follow_tree(self, ends: list[int], budget: int, max_depth: int, min_prob: float) -> Tree:
        """The `budget` most probable continuations after the occurrences ending at `ends`
        as a tree (each node's probability: its parent's times the share of the parent's
        occurrences that continue with it), best first, none deeper than `max_depth` or
        less probable than `min_prob`; with its score, the sum of the nodes' probabilities."""
        tree = Tree()
        heap: list[tuple[float, int, int, int, int, list[int]]] = []  # (-p, order, parent, depth, token, ends)
        order = itertools.count()  # among equal probabilities, the first pushed first

        def push_children(parent: int, depth: int, live: list[int], prob: float) -> None:
            if depth > max_depth:
                return
            groups: dict[int, list[int]] = {}
            for end in live:  # newest first, so among equals the newest occurrence's token leads
                token = self.token_at(end + depth)
                if token != SEPARATOR:
                    groups.setdefault(token, []).append(end)
            total = sum(len(g) for g in groups.values())
            for token, group in groups.items():
                p = prob * len(group) / total
                if p >= min_prob:
                    heapq.heappush(heap, (-p, next(order), parent, depth, token, group))

        push_children(-1, 1, ends, 1.0)
        while heap and len(tree.tokens) < budget:
            negp, _, parent, depth, token, live = heapq.heappop(heap)
            tree.add(token, parent, -negp)
            push_children(len(tree.tokens) - 1, depth + 1, live, -negp)
        return tree


@dataclass
class Tree:
    """A drafted token tree: tokens, each one's parent (-1: the context's last token), and
    the expected number of accepted tokens (the sum of the nodes' probabilities)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    score: float = 0.0

    def add(self, token: int, parent: int, prob: float) -> None:
        self.tokens.append(token)
        self.parents.append(parent)
        self.score += prob

    def is_chain(self) -> bool:
        return all(parent == i - 1 for i, parent in enumerate(self.parents))


@dataclass
class _SessionState:
    own: SuffixIndex  # the session's committed tokens (and those it was told to assume)
    prompt_len: int  # tokens it held when first seen: what follows is its output
    finalizer: weakref.finalize[[int, None], DraftSession]  # drops this state when the session is collected


class SuffixDrafter:
    """`suffix`: drafts from the session's own tokens and a shared stream of recent outputs."""

    kind: ClassVar[str] = "suffix"
    needs_model: ClassVar[bool] = False
    trees: ClassVar[bool] = True  # token trees for plain greedy requests

    def __init__(
        self,
        shared_tokens: int = 1 << 16,
        max_match: int = 32,
        max_candidates: int = 32,
        min_prob: float = 0.1,
        spec_factor: float = 2.0,  # offline on SmolLM2 outputs: 1.0 drafts half as much, accepts 3% fewer tokens a step
    ) -> None:
        if max_match < 1 or max_candidates < 1:
            raise ValueError(f"max_match and max_candidates must be >= 1, got {max_match}, {max_candidates}")
        if not 0.0 <= min_prob <= 1.0 or spec_factor <= 0:
            raise ValueError(f"need 0 <= min_prob <= 1 and spec_factor > 0, got {min_prob}, {spec_factor}")
        self.name = self.kind
        self.shared = SuffixIndex(shared_tokens)  # recent outputs of released sessions, oldest evicted
        self.max_match, self.max_candidates = max_match, max_candidates
        self.min_prob, self.spec_factor = min_prob, spec_factor
        # Keyed by id(): DraftSession is an unhashable dataclass. A session the worker drops
        # without a release (evicted, idle) takes its state with it through the finalizer.
        self._states: dict[int, _SessionState] = {}

    @classmethod
    def create(cls, runner: Runner | None, model_name: str, prefix_store: PrefixStore | None) -> SuffixDrafter:
        return cls()

    @property
    def num_sessions(self) -> int:
        return len(self._states)

    def propose(self, rows: list[DraftRow]) -> list[Proposal]:
        out = []
        for session, item in rows:
            tree = self.draft(session, item)
            out.append(Proposal(tree.tokens, parents=None if tree.is_chain() else tree.parents))
        return out

    def draft(self, session: DraftSession, item: ProposeItem) -> Tree:
        """Up to item.num_tokens tokens; the shared stream's too for a greedy item; a tree
        unless penalties or a constraint need one history per row (see the module's docstring)."""
        if item.num_tokens <= 0:
            return Tree()
        params = item.sampling
        tree = self.trees and not (params.penalized or params.constrained)
        own = self._sync(session).own
        # After a forced draft prefix (drafters/forced.py) the context runs past the index.
        context = session.tokens + session.draft_prefix if session.draft_prefix else session.tokens
        best = self._follow(own, context, item.num_tokens, tree, exclude=own.length - 1)
        if params.greedy and len(self.shared):
            other = self._follow(self.shared, context, item.num_tokens, tree)
            if other.score > best.score:
                best = other
        return best

    def _follow(self, index: SuffixIndex, context: list[int], k: int, tree: bool, exclude: int = -1) -> Tree:
        length, ends = index.match(context, self.max_match, self.max_candidates, exclude)
        if not ends:
            return Tree()
        depth = min(k, max(1, int(self.spec_factor * length)))
        if tree:
            return index.follow_tree(ends, k, depth, self.min_prob)
        tokens, score = index.follow(ends, depth, self.min_prob)
        return Tree(tokens, list(range(-1, len(tokens) - 1)), score)

    def learn(self, session: DraftSession, committed: list[int]) -> None:
        state = self._sync(session, known=len(session.tokens) - len(committed))
        assert state.own.length == len(session.tokens)

    def _sync(self, session: DraftSession, known: int | None = None) -> _SessionState:
        """The session's state, its index brought to the session's tokens: cut back to the
        `known` tokens that did not change (after a rollback), then the rest appended."""
        state = self._states.get(id(session))
        if state is None:
            key = id(session)
            finalizer = weakref.finalize(session, self._states.pop, key, None)
            state = self._states[key] = _SessionState(SuffixIndex(), len(session.tokens), finalizer)
        own, tokens = state.own, session.tokens
        cut = min(own.length, len(tokens) if known is None else known)
        if cut < own.length:
            own.truncate(cut)
        own.extend(tokens[own.length :])
        return state

    def forget(self) -> None:
        """Empty the shared stream (what earlier requests taught): a benchmark of prompts
        the drafter has not seen starts from here."""
        assert self.shared.capacity is not None
        self.shared = SuffixIndex(self.shared.capacity)

    def release(self, session: DraftSession) -> None:
        """Free the session's index; its output joins the shared stream."""
        state = self._states.pop(id(session), None)
        if state is None:
            return
        state.finalizer.detach()
        tokens = session.tokens
        if len(tokens) <= state.prompt_len:
            return  # no output
        # The prompt's last tokens come along: they are the context the output's first tokens match.
        sequence = tokens[max(0, state.prompt_len - self.max_match) :]
        assert self.shared.capacity is not None
        self.shared.append(SEPARATOR)
        self.shared.extend(sequence[-(self.shared.capacity - 1) :])


class SuffixChainDrafter(SuffixDrafter):
    """`suffix-chain`: the suffix drafter proposing one continuation, never a tree (a target
    that cannot verify trees, or a side-by-side comparison with `suffix`)."""

    kind: ClassVar[str] = "suffix-chain"
    trees: ClassVar[bool] = False
