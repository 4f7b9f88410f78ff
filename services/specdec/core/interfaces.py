"""The two seams of the speculation loop. Local implementations wrap in-process workers;
remote ones are gRPC clients of the draft and target tiers. The loop cannot tell."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from specdec.core.adaptive import CostBook
from specdec.core.types import Proposal, ProposeItem, Verdict, VerifyItem


class Drafter(Protocol):
    async def propose(self, item: ProposeItem) -> Proposal: ...

    async def release(self, session_id: str) -> None: ...


class Verifier(Protocol):
    async def verify(self, item: VerifyItem) -> Verdict: ...

    async def release(self, session_id: str) -> None: ...


@dataclass
class Tiers:
    """What a request's loop runs against, owned by the engine or the coordinator: the
    verifier, the drafter (None: plain decoding only) and the costs they have reported."""

    verifier: Verifier
    drafter: Drafter | None = None
    costs: CostBook = field(default_factory=CostBook)
