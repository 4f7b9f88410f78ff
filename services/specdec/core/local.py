"""In-process Drafter and Verifier: the workers behind continuous micro-batchers.

The draft and target services use exactly these, fed from their gRPC streams; the
embedded engine uses them directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from specdec.core.batcher import BatchResults, MicroBatcher
from specdec.core.drafters.worker import DraftWorker
from specdec.core.target import TargetWorker
from specdec.core.types import Proposal, ProposeItem, Verdict, VerifyItem

W = TypeVar("W", DraftWorker, TargetWorker)
I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class _Batched(Generic[W, I, R]):
    def __init__(self, worker: W, run_batch: Callable[[list[I]], BatchResults[R]], max_batch_size: int) -> None:
        self.worker: W = worker
        self.batcher: MicroBatcher[I, R] = MicroBatcher(run_batch, max_batch_size)

    async def release(self, session_id: str) -> None:
        self.batcher.leave()
        await self.batcher.call(lambda: self.worker.release(session_id))


class LocalVerifier(_Batched[TargetWorker, VerifyItem, Verdict]):
    def __init__(self, worker: TargetWorker, max_batch_size: int = 32) -> None:
        super().__init__(worker, worker.verify_batch, max_batch_size)

    async def verify(self, item: VerifyItem) -> Verdict:
        return await self.batcher.submit(item)


class LocalDrafter(_Batched[DraftWorker, ProposeItem, Proposal]):
    def __init__(self, worker: DraftWorker, max_batch_size: int = 32) -> None:
        super().__init__(worker, worker.propose_batch, max_batch_size)

    async def propose(self, item: ProposeItem) -> Proposal:
        return await self.batcher.submit(item)
