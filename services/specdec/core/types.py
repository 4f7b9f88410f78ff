"""Work items exchanged between the speculation loop, the drafters and the verifier.

Items carry tokens as a delta: `prefix_len` tokens the replica is believed to hold already,
then `tokens` after them. A replica that lacks the prefix answers `needs_resync` and the
caller resends from 0, so a restarted or re-routed replica recovers by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdec.core.sampling import SamplingParams


@dataclass
class ProposeItem:
    session_id: str
    prefix_len: int  # committed tokens the drafter holds already
    tokens: list[int]  # [num_new] committed tokens after them
    num_tokens: int  # draft length wanted
    sampling: SamplingParams
    drafter: str = "ngram"  # "ngram" | "model:NAME"


@dataclass
class Proposal:
    tokens: list[int] = field(default_factory=list)  # [k] drafted ids; empty = nothing to propose
    probs: torch.Tensor | None = None  # [k, vocab] float64 q; None = one-hot (deterministic)
    needs_resync: bool = False
    # The drafter's cost line, fitted over its recent draft passes (core/cost.py): one
    # drafted token per sequence takes about draft_pass_base_s + draft_row_s * rows.
    # 0, 0 = not measured (model-free drafters cost next to nothing).
    draft_pass_base_s: float = 0.0
    draft_row_s: float = 0.0
    replica: str = ""  # the draft replica that answered ("" in-process)
    unavailable: bool = False  # no replica serves the drafter: this step decodes plainly
    # A token tree instead of a chain: each token's parent among `tokens` (-1: the last
    # committed token), parents first. Deterministic drafters; no penalty, no constraint.
    parents: list[int] | None = None


@dataclass
class VerifyItem:
    session_id: str
    prefix_len: int  # committed tokens the verifier holds already
    tokens: list[int]  # [num_new] committed tokens after them
    draft_tokens: list[int]  # [k]
    draft_probs: torch.Tensor | None  # [k, vocab] float64 q, or None for one-hot drafts
    sampling: SamplingParams
    logprobs: int = -1  # -1: none; n >= 0: each committed token's log-probability and the top n
    draft_parents: list[int] | None = None  # a token tree (Proposal.parents); None: a chain


@dataclass
class TokenLogprob:
    """A committed token's log-probability under the target's raw distribution at its
    position (log-softmax of the logits, before temperature / top-k / top-p), and the
    `top` most likely tokens there, most likely first."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Verdict:
    num_accepted: int = 0  # leading draft tokens kept
    tokens: list[int] = field(default_factory=list)  # accepted drafts + the target's own token
    batch_size: int = 0  # sequences in the forward pass that produced this verdict
    needs_resync: bool = False
    # The verifier's current cost line, fitted over its recent passes (core/cost.py): a
    # pass takes about pass_base_s + row_s * rows. 0, 0 = unknown.
    pass_base_s: float = 0.0
    row_s: float = 0.0
    replica: str = ""  # the target replica that answered ("" in-process)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when the item asked
