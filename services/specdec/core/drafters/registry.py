"""The drafters there are, and the one parser of a drafter spec.

A spec is `none`, a model-free drafter's kind (`ngram`, `suffix`) or `kind:MODEL` for a drafter
that runs a model (`model:NAME`). It is parsed here once, into a `DrafterSpec`; everything
else passes that around. A new drafter is a new class added to `DRAFTERS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from specdec.core.drafters.base import DraftMethod
from specdec.core.drafters.model import ModelDrafter
from specdec.core.drafters.ngram import NgramDrafter
from specdec.core.drafters.suffix import SuffixChainDrafter, SuffixDrafter
from specdec.core.errors import InvalidArgument

if TYPE_CHECKING:
    from specdec.core.prefix_store import PrefixStore
    from specdec.core.runner import Runner

DRAFTERS: dict[str, type[DraftMethod]] = {
    cls.kind: cls for cls in (NgramDrafter, SuffixDrafter, SuffixChainDrafter, ModelDrafter)
}
NONE = "none"  # no drafter: plain decoding


class DrafterSpec(NamedTuple):
    kind: str  # "none" or a key of DRAFTERS
    model: str = ""  # the draft model, for drafters that need one

    def __str__(self) -> str:
        return f"{self.kind}:{self.model}" if self.model else self.kind

    @property
    def speculates(self) -> bool:
        return self.kind != NONE

    @property
    def needs_model(self) -> bool:
        return bool(self.model)


def parse_drafter(text: str | DrafterSpec, field: str = "speculation.drafter") -> DrafterSpec:
    """'none' | 'ngram' | 'suffix' | 'model:NAME' -> DrafterSpec; InvalidArgument naming `field` otherwise."""
    if isinstance(text, DrafterSpec):
        return text
    kind, colon, model = text.partition(":")
    cls = DRAFTERS.get(kind)
    if text == NONE or (cls is not None and cls.needs_model == bool(model) and bool(colon) == bool(model)):
        return DrafterSpec(kind, model)
    usage = ", ".join([NONE, *(f"{k}:NAME" if c.needs_model else k for k, c in DRAFTERS.items())])
    raise InvalidArgument(field, f"unknown drafter {text[:100]!r}; use {usage}")  # never echo unbounded input


def build_methods(runner: Runner | None, model_name: str, prefix_store: PrefixStore | None) -> list[DraftMethod]:
    """Every drafter that can run on a replica holding `runner` (its draft model, or None)."""
    built = (cls.create(runner, model_name, prefix_store) for cls in DRAFTERS.values())
    return [method for method in built if method is not None]
