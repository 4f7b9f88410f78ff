"""Admission control: how many requests the coordinator runs at once.

Like vLLM's max_num_seqs: past the limit, requests wait their turn (first come, first
served) instead of all crowding the verify batches at once, and the number waiting is the
coordinator's queue depth, which the operator scales on.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Admission:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {limit}")
        self.limit = limit
        self._slots = asyncio.Semaphore(limit)
        self.waiting = 0  # requests queued for a slot

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot for the body; a caller cancelled while queued leaves the queue."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()
