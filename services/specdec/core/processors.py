"""Logits processing that depends on the history: penalties (core/penalties.py) and a
structured-output constraint (core/grammar.py), applied before temperature / top-k /
top-p / min-p, to the target's verify rows and to the model drafter's rows alike.

min_tokens yields to a constraint: a row whose grammar allows only tokens min_tokens
masks (the text is complete, only EOS may follow) keeps them, rather than allowing nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
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
    if grammar is not None:
        logits = _constrained(logits, history + drafts, len(history), params, allowed)
    elif params.penalized:
        logits = penalize(logits, history + drafts, len(history), params)
    return logits, drafts, draft_probs


def _constrained(
    logits: torch.Tensor, tokens: list[int], base: int, params: SamplingParams, allowed: np.ndarray
) -> torch.Tensor:
    """Penalised (if the request asks) then masked by the grammar; rows left with nothing
    by min_tokens are processed without it (module doc)."""
    out = mask_logits(penalize(logits, tokens, base, params) if params.penalized else logits, allowed)
    if not params.min_tokens:
        return out
    dead = ~torch.isfinite(out).any(dim=-1)
    if bool(dead.any()):
        relaxed = mask_logits(penalize(logits, tokens, base, dataclasses.replace(params, min_tokens=0)), allowed)
        out = torch.where(dead[:, None], relaxed, out)
    return out


def draft_row(
    logits: torch.Tensor, history: list[int], params: SamplingParams, grammar: GrammarState | None
) -> torch.Tensor | None:
    """The drafter's one row [1, vocab] after `history` (committed tokens and the drafts so
    far), processed as the target will; None when the grammar allows nothing (or only the
    end of text after it stopped), which ends the draft."""
    if grammar is None:
        return penalize(logits, history, len(history), params) if params.penalized else logits
    if grammar.matcher.is_stopped():
        return None
    allowed = grammar.allowed()
    if not allowed.any():
        return None
    return _constrained(logits, history, len(history), params, allowed[None, :])
