"""What a drafter is: a class behind `DraftMethod`. It proposes for a batch of sessions,
learns from what the target committed after its last proposal, and frees a session's
state. The registry (`drafters/registry.py`) lists the classes and parses a drafter spec
once; the worker (`drafters/worker.py`) routes each item to the drafter it names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from specdec.core.types import Proposal, ProposeItem

if TYPE_CHECKING:
    from specdec.core.batcher import NotYet
    from specdec.core.grammar import GrammarState
    from specdec.core.kv_cache import SessionKV
    from specdec.core.prefix_store import PrefixStore
    from specdec.core.runner import Runner


@dataclass
class DraftSession:
    tokens: list[int] = field(default_factory=list)  # the session's committed tokens
    kv: SessionKV | None = None  # the draft model's cache (model drafters)
    grammar: GrammarState | None = None  # a constrained request's grammar state (every drafter)
    # Tokens the draft begins with (the grammar forced them, drafters/forced.py): a
    # model-free drafter proposes what follows them. Empty outside such a call.
    draft_prefix: list[int] = field(default_factory=list)


DraftRow = tuple[DraftSession, ProposeItem]


class DraftMethod(Protocol):
    """One way of drafting. `name` is the drafter spec it serves ("ngram", "model:NAME")."""

    kind: ClassVar[str]  # the spec's kind: what a caller writes before any ':'
    needs_model: ClassVar[bool]  # the spec names a model: "kind:NAME"
    name: str

    @classmethod
    def create(cls, runner: Runner | None, model_name: str, prefix_store: PrefixStore | None) -> DraftMethod | None:
        """An instance for a replica holding `runner` (its draft model, or None); None when
        this drafter cannot run there."""
        ...

    def propose(self, rows: list[DraftRow]) -> Sequence[Proposal | NotYet]:
        """One proposal per row, in order, for sessions whose tokens are in sync; NOT_YET
        for a row to run again in the next batch (a prompt still being prefilled)."""
        ...

    def learn(self, session: DraftSession, committed: list[int]) -> None:
        """The target committed `committed` after the session's last proposal: its verdict,
        as the draft tier sees it."""
        ...

    def release(self, session: DraftSession) -> None:
        """Free what this drafter holds for the session."""
        ...
