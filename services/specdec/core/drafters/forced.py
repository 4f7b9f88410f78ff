"""Grammar-aware drafting for the model-free drafters (ngram, suffix) on constrained requests.

Left to themselves they know nothing of the grammar: they propose text it forbids (the
target cuts the draft there) and never propose the tokens it forces, the JSON keys,
quotes, braces and separators that are a good share of a structured output. Here a
constrained session's draft is built in rounds, each one:

1. the grammar's forced tokens (llguidance's fast-forward tokens);
2. the drafter's own proposal after the draft so far (`DraftSession.draft_prefix`), cut
   at the first token the grammar forbids;
3. when the drafter had nothing the grammar allows, the forced bytes still left,
   tokenized alone (their last token may differ from the model's, which merges it with
   the free text after it: a draft, so the target judges).

A round that added tokens is followed by another (the grammar may force more after them,
and the drafter may find a new match), up to MAX_ROUNDS or the k asked for.

The grammar state is the session's `DraftSession.grammar`, advanced over the drafted tokens
and left there: the next proposal's sync rolls back the ones the target rejected and
consumes the tokens it committed after them, so a step costs the tokens it drafts, never a
replay. Exactness does not depend on any of this: drafts stay one-hot, and the target masks
every verified row itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from specdec.core.errors import InvalidArgument
from specdec.core.grammar import GrammarState, grammar_state
from specdec.core.types import Proposal

if TYPE_CHECKING:
    from specdec.core.batcher import NotYet
    from specdec.core.drafters.base import DraftMethod, DraftRow, DraftSession
    from specdec.core.types import ProposeItem

MAX_ROUNDS = 4  # of forced tokens then the drafter's own: each costs one batched drafter call


def propose_guided(method: DraftMethod, rows: list[DraftRow], vocab: Any) -> list[Proposal | NotYet]:
    """`method.propose(rows)`, the constrained rows drafted under their grammar (module doc).
    A row whose grammar cannot follow its tokens (another vocabulary) drafts as before."""
    states = {j: _synced(*row, vocab) for j, row in enumerate(rows)}
    guided = {j: state for j, state in states.items() if state is not None}
    results: list[Proposal | NotYet] = [Proposal()] * len(rows)
    free = [j for j in range(len(rows)) if j not in guided]
    if free:
        for j, proposal in zip(free, method.propose([rows[j] for j in free])):
            results[j] = proposal
    drafts: dict[int, list[int]] = {j: [] for j in guided}
    live = list(guided)
    for _ in range(MAX_ROUNDS):
        asking = []
        for j in live:
            room = rows[j][1].num_tokens - len(drafts[j])
            drafts[j] += guided[j].take(guided[j].forced()[:room])
            if len(drafts[j]) < rows[j][1].num_tokens and not guided[j].matcher.is_stopped():
                asking.append(j)
        if not asking:
            break
        live = []
        for j, own in zip(asking, _own_drafts(method, [(rows[j], drafts[j]) for j in asking])):
            room = rows[j][1].num_tokens - len(drafts[j])
            taken = guided[j].take(own[:room]) or guided[j].take(guided[j].forced_text_tokens()[:room])
            drafts[j] += taken
            if taken:
                live.append(j)
    for j, draft in drafts.items():
        results[j] = Proposal(draft)
    return results


def _synced(session: DraftSession, item: ProposeItem, vocab: Any) -> GrammarState | None:
    """A constrained row's grammar state at its committed output (the last proposal's
    rejected drafts rolled back, the tokens committed after the accepted ones consumed);
    None for an unconstrained row, one asking for no draft, or one the grammar cannot follow."""
    params = item.sampling
    if not params.constrained:
        session.grammar = None
        return None
    try:
        session.grammar = grammar_state(
            session.grammar, vocab, params.grammar_kind, params.grammar, session.tokens[params.prompt_len :]
        )
    except InvalidArgument:  # drafts unconstrained then, as a model drafter does
        session.grammar = None
    return session.grammar if item.num_tokens > 0 else None


def _own_drafts(method: DraftMethod, asks: Sequence[tuple[DraftRow, list[int]]]) -> list[list[int]]:
    """The drafter's chain after each row's draft so far, for the room left; a tree (which
    a constrained request should not get) counts as nothing."""
    rows = [
        (session, dataclasses.replace(item, num_tokens=item.num_tokens - len(prefix)))
        for (session, item), prefix in asks
    ]
    for (session, _), prefix in asks:
        session.draft_prefix = prefix
    try:
        proposals = method.propose(rows)
    finally:
        for (session, _), _prefix in asks:
            session.draft_prefix = []
    return [p.tokens if isinstance(p, Proposal) and p.parents is None else [] for p in proposals]
