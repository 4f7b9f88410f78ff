"""Continuous micro-batching: whatever work is queued when the worker frees up runs as one
batch. A lone session runs at once; sessions that were in the previous batch get a short
gather window (`gather_s`, 4 ms, 1 ms for a paired drafter/verifier) to rejoin, and
requests that arrive while a batch is running share the next one.

A batch function may answer an item with `NOT_YET`: the item stays queued, first in line,
and runs again in the next batch (a long prefill runs chunk by chunk this way, sharing
each pass with the other sessions' steps); its caller hears nothing until a real result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from specdec.core import compute

log = logging.getLogger(__name__)
MAX_PARTNER_WAIT_S = 2.0  # liveness bound on waiting for a paired batcher (see share_compute_with)

Item = TypeVar("Item")
Result = TypeVar("Result")
T = TypeVar("T")


class NotYet:
    """The type of NOT_YET."""

    def __repr__(self) -> str:
        return "NOT_YET"


NOT_YET = NotYet()  # a batch result: run this item again in the next batch
BatchResults = Sequence[Result | Exception | NotYet]


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    max_batch_size: int = 0
    queue_depth: int = 0  # items waiting right now


class MicroBatcher(Generic[Item, Result]):
    """Runs `run_batch(items) -> results` (same order) on the process's compute thread
    (`core.compute`), so the event loop keeps accepting work while the model computes. A
    result that is an Exception fails only its own item's caller."""

    def __init__(
        self,
        run_batch: Callable[[list[Item]], BatchResults[Result]],
        max_batch_size: int = 32,
        gather_s: float = 0.004,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        # Sessions that were in the last batch come back a little apart (each has its own
        # drafting and bookkeeping to do); waiting up to gather_s for them to rejoin keeps
        # batches full. A lone session never waits: the previous batch held only itself.
        self.gather_s = gather_s
        self._last_size = 0
        self._partner: MicroBatcher[Any, Any] | None = None  # see share_compute_with
        self._downstream = False  # the partner's queued sessions come here next
        self.running = False  # a batch is on the compute thread
        self.busy_since: float | None = None  # monotonic start of the running batch (the watchdog reads it)
        self.gathering = False  # the worker holds the next batch open for more items (tests wait on it)
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._again = 0  # of them, the first ones: answered NOT_YET by the last batch
        self._rerun = False  # the running batch holds only such items
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = compute.executor()
        self.stats = BatcherStats()

    @property
    def utilization(self) -> float:
        """Mean batch size so far, as a fraction of max_batch_size (a load figure)."""
        s = self.stats
        return round(s.items / s.batches / self.max_batch_size, 4) if s.batches else 0.0

    def share_compute_with(self, upstream: MicroBatcher[Any, Any], gather_s: float = 0.001) -> None:
        """Pair two batchers whose sessions pass from one to the other on one compute
        thread: `upstream` (the embedded engine's drafter) feeds this one (its verifier).

        While one runs a batch, the other keeps gathering: the compute thread is busy
        anyway, and the sessions in that batch come over next. This one also waits while
        upstream has sessions queued, since they come here right after. Without this the
        sessions split into cohorts, one drafting while another verifies, and every pass
        runs part full for good (measured: 5.2 of 8 sessions a pass; 2 sessions at 0.72x
        plain). Once the partner is idle, sessions that are coming arrive within an
        event-loop turn, so the window can be short. (Upstream does not wait for this
        one's queue: that would let the two wait for each other.)"""
        self._partner, upstream._partner = upstream, self
        self._downstream = True
        self.gather_s = upstream.gather_s = gather_s

    def wrap_batches(
        self,
        wrap: Callable[[Callable[[list[Item]], BatchResults[Result]]], Callable[[list[Item]], BatchResults[Result]]],
    ) -> None:
        """Decorate the batch function (the services add tracing and metrics this way)."""
        self._run_batch = wrap(self._run_batch)

    async def submit(self, item: Item) -> Result:
        self._ensure_started()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self.stats.queue_depth = len(self._pending)
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    def leave(self) -> None:
        """A session has ended (released): the next batch stops waiting for it to rejoin.
        Without this the batch after a session ends would wait out `gather_s` for it, and a
        session left alone would wait at its next step for a partner that is gone."""
        self._last_size = max(0, self._last_size - 1)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the worker thread, serialised with the batches (e.g. session release)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._worker())

    async def _worker(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                self.gathering = True
                await self._gather()
                self.gathering = False
                batch = self._pending[: self.max_batch_size]
                del self._pending[: len(batch)]
                self._rerun = self._again >= len(batch)  # only items run again: none will come over
                self._again = max(0, self._again - len(batch))
                self.stats.queue_depth = len(self._pending)
                items = [item for item, _ in batch]
                self.running, self.busy_since = True, time.monotonic()
                try:
                    results = await loop.run_in_executor(self._executor, self._run_batch, items)
                except Exception as exc:  # a bad batch fails its own callers, not the worker
                    log.error("a batch of %d failed", len(batch), exc_info=exc)
                    # The traceback's frames hold the batch's tensors and sessions: free them
                    # now, not whenever the collector finds the cycle.
                    traceback.clear_frames(exc.__traceback__)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                finally:
                    self.running, self.busy_since = False, None
                self._record(len(batch))
                # A caller that went away (cancelled) is not run again.
                again = [(it, fut) for (it, fut), result in zip(batch, results) if result is NOT_YET and not fut.done()]
                if again:  # older than anything queued since: first in line
                    self._pending[:0] = again
                    self._again += len(again)
                    self.stats.queue_depth = len(self._pending)
                for (_, future), result in zip(batch, results):
                    if future.done() or isinstance(result, NotYet):
                        continue
                    if isinstance(result, Exception):  # that item failed alone (see run_batch)
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    async def _gather(self) -> None:
        start = time.monotonic()
        deadline = start + self.gather_s
        want = min(self._last_size, self.max_batch_size)
        waited_on_partner = False
        while len(self._pending) < self.max_batch_size:
            now = time.monotonic()
            if self._partner_busy() and now - start < MAX_PARTNER_WAIT_S:
                # The compute thread is busy with the partner's batch, so waiting costs
                # nothing, and its sessions come here next: merge them, whatever the last
                # batch size was (a pair split into cohorts has last size 1 for good).
                deadline, waited_on_partner = now + self.gather_s, True
            elif waited_on_partner:
                # Its sessions resubmit an event-loop turn after it finishes: let them.
                waited_on_partner = False
                for _ in range(2):
                    await asyncio.sleep(0)
                continue
            elif len(self._pending) >= want or now >= deadline:
                return
            await asyncio.sleep(0.0005)

    def _partner_busy(self) -> bool:
        partner = self._partner
        # Not for the partner's items run again (a prompt prefilling in chunks): they do not
        # come here next, and waiting for them would hold every step for the whole prefill.
        if partner is None:
            return False
        return (partner.running and not partner._rerun) or (self._downstream and len(partner._pending) > partner._again)

    def stalled_s(self) -> float:
        """How long the running batch has been on the compute thread (0 when idle)."""
        started = self.busy_since
        return 0.0 if started is None else time.monotonic() - started

    def _record(self, size: int) -> None:
        self._last_size = size
        self.stats.batches += 1
        self.stats.items += size
        self.stats.max_batch_size = max(self.stats.max_batch_size, size)

    async def stop(self) -> None:
        """Stop the worker task; the next submit starts a new one (e.g. on another loop).
        The compute thread itself is the process's and stays."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
