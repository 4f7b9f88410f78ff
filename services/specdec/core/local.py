"""In-process Drafter and Verifier: the workers behind continuous micro-batchers.

The draft and target services use exactly these, fed from their gRPC streams; the
embedded engine uses them directly.
"""
from __future__ import annotations

from specdec.core.batcher import MicroBatcher
from specdec.core.drafters.base import DraftWorker
from specdec.core.target import TargetWorker
from specdec.core.types import Proposal, ProposeItem, Verdict, VerifyItem


class LocalVerifier:
    def __init__(self, worker: TargetWorker, max_batch_size: int = 32) -> None:
        self.worker = worker
        self.batcher: MicroBatcher[VerifyItem, Verdict] = MicroBatcher(worker.verify_batch, max_batch_size)

    async def verify(self, item: VerifyItem) -> Verdict:
        return await self.batcher.submit(item)

    async def release(self, session_id: str) -> None:
        await self.batcher.call(lambda: self.worker.release(session_id))

    async def close(self) -> None:
        await self.batcher.close()


class LocalDrafter:
    def __init__(self, worker: DraftWorker, max_batch_size: int = 32) -> None:
        self.worker = worker
        self.batcher: MicroBatcher[ProposeItem, Proposal] = MicroBatcher(worker.propose_batch, max_batch_size)

    async def propose(self, item: ProposeItem) -> Proposal:
        return await self.batcher.submit(item)

    async def release(self, session_id: str) -> None:
        await self.batcher.call(lambda: self.worker.release(session_id))

    async def close(self) -> None:
        await self.batcher.close()
