"""Logits processing that depends on the history: penalties (core/penalties.py) and a
structured-output constraint (core/grammar.py), applied before temperature / top-k /
top-p / min-p, to the target's verify rows and to the model drafter's rows alike."""

from __future__ import annotations

import torch

from specdec.core.grammar import GrammarState, mask_logits
from specdec.core.penalties import penalize
from specdec.core.sampling import SamplingParams


def verify_rows(
    logits: torch.Tensor,
    history: list[int],
    drafts: list[int],
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    grammar: GrammarState | None,
) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """The target's k + 1 rows after `history` (the committed tokens), row j seeing the
    first j drafts. With a grammar, the draft ends before its first forbidden token (the
    rows after it are dropped: nothing past it can be accepted). -> (logits, drafts, q)."""
    if grammar is not None:
        allowed, keep = grammar.walk(drafts)
        drafts = drafts[:keep]
        draft_probs = None if draft_probs is None else draft_probs[:keep]
        logits = logits[: keep + 1]
    if params.penalized:
        logits = penalize(logits, history + drafts, len(history), params)
    if grammar is not None:
        logits = mask_logits(logits, allowed)
    return logits, drafts, draft_probs


def draft_row(
    logits: torch.Tensor, history: list[int], params: SamplingParams, grammar: GrammarState | None
) -> torch.Tensor | None:
    """The drafter's one row [1, vocab] after `history` (committed tokens and the drafts so
    far), processed as the target will; None when the grammar allows nothing (or only the
    end of text after it stopped), which ends the draft."""
    if params.penalized:
        logits = penalize(logits, history, len(history), params)
    if grammar is not None:
        if grammar.matcher.is_stopped():
            return None
        allowed = grammar.allowed()
        if not allowed.any():
            return None
        logits = mask_logits(logits, allowed[None, :])
    return logits
