"""The two seams of the speculation loop. Local implementations wrap in-process workers;
remote ones are gRPC clients of the draft and target tiers. The loop cannot tell."""
from __future__ import annotations

from typing import Protocol

from specdec.core.types import Proposal, ProposeItem, Verdict, VerifyItem


class Drafter(Protocol):
    async def propose(self, item: ProposeItem) -> Proposal: ...

    async def release(self, session_id: str) -> None: ...


class Verifier(Protocol):
    async def verify(self, item: VerifyItem) -> Verdict: ...

    async def release(self, session_id: str) -> None: ...
