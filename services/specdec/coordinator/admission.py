"""Admission control: how many requests the coordinator runs at once.

Like vLLM's max_num_seqs: past the limit, requests wait their turn (first come, first
served) instead of all crowding the verify batches at once, and the number waiting is the
coordinator's queue depth, which the operator scales on. The queue is bounded too: past
`max_queued`, a request is refused at once with a retry hint (RESOURCE_EXHAUSTED) rather
than held for longer than any client would wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from specdec.core.errors import Overloaded

RETRY_AFTER_S = 1.0


class Admission:
    def __init__(self, limit: int, max_queued: int = 1024) -> None:
        if limit < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {limit}")
        if max_queued < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued}")
        self.limit, self.max_queued = limit, max_queued
        self._slots = asyncio.Semaphore(limit)
        self.waiting = 0  # requests queued for a slot

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot for the body; a caller cancelled while queued leaves the
        queue. Overloaded when the queue is full."""
        if self._slots.locked() and self.waiting >= self.max_queued:
            raise Overloaded(f"{self.waiting} requests are queued (SPECDEC_MAX_QUEUED_REQUESTS)", RETRY_AFTER_S)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()
