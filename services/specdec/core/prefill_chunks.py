"""Chunked prefill, shared by the tiers that prefill prompts: the target worker and the
model drafter (as vLLM's chunked prefill).

A pass runs the other sessions' steps whole and then as much of a long prompt as fits the
pass's time budget (`chunk_s`, SPECDEC_PREFILL_CHUNK_S; the chunk size from `PrefillCost`),
so a long prompt delays everyone else by about one budget a pass instead of its whole
prefill. The caller answers a prompt that did not finish `NOT_YET` (the batcher runs it
again next pass); its cache holds the progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from specdec.core.attention import GROUP_MAX_ROWS
from specdec.core.cost import INITIAL_PREFILL_CHUNK, MIN_PREFILL_CHUNK, PassCost, PrefillCost
from specdec.core.runner import ForwardItem


def prefills(f: ForwardItem) -> bool:
    """Whether the item feeds a prompt (more context rows than a step's, or a chunk of one)
    rather than a step: a step runs whole, a prefill may be chunked, and the two are costed
    apart."""
    return f.num_logits == 0 or len(f.tokens) - f.num_logits > GROUP_MAX_ROWS


def plan_chunks(
    full: list[ForwardItem], chunk_s: float, chunk_tokens: int, step_cost: PassCost, prefill_cost: PrefillCost
) -> list[ForwardItem | None]:
    """What each item runs in this pass: short items (steps) whole; a long feed (a
    prefill) as its next chunk, with no logits, or whole when the rest fits; None
    when earlier prefills took this pass's budget (each pass advances at least one).
    A chunk never takes the rows that ask for logits (the newest committed token, fed
    with the drafts). `chunk_tokens` > 0: that fixed size instead of the budget's; both
    0: no chunking."""
    if chunk_s <= 0 and chunk_tokens <= 0:
        return list(full)
    steps = sum(len(f.tokens) for f in full if not prefills(f))
    budget = chunk_s - step_cost.predict(steps)
    planned: list[ForwardItem | None] = []
    advanced = False
    for f in full:
        start, size = f.kv.length, len(f.tokens)
        if not prefills(f):
            planned.append(f)
            continue
        if chunk_tokens > 0:
            n = chunk_tokens
        elif advanced and budget < prefill_cost.predict(start, MIN_PREFILL_CHUNK):
            planned.append(None)
            continue
        else:
            n = prefill_cost.chunk_tokens(start, budget, INITIAL_PREFILL_CHUNK)
        n = min(n, size - f.num_logits)  # > 0: the item prefills
        planned.append(f if n + f.num_logits >= size else ForwardItem(f.kv, f.tokens[:n], 0))
        budget -= prefill_cost.predict(start, n)
        advanced = True
    return planned


def timed_forward(
    forward: Callable[[list[ForwardItem]], list[torch.Tensor]],
    items: list[ForwardItem],
    step_cost: PassCost,
    prefill_cost: PrefillCost,
) -> list[torch.Tensor]:
    """The forward pass, teaching the cost models: a pass of steps only fits the
    per-row cost; one with prefill rows fits the prefill cost on what it took beyond
    its steps' predicted share."""
    chunks = [(f.kv.length, len(f.tokens)) for f in items if prefills(f)]
    steps = sum(len(f.tokens) for f in items if not prefills(f))
    started = time.perf_counter()
    logits = forward(items)
    elapsed = time.perf_counter() - started
    if chunks:
        prefill_cost.observe(chunks, elapsed - step_cost.predict(steps))
    else:
        step_cost.observe(steps, elapsed)
    return logits
