"""The admission queue is bounded: past it a request is refused at once, with a retry hint."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from specdec.coordinator.admission import Admission
from specdec.core.errors import Overloaded
from specdec.rpc.errors import _status_for


async def _turns(n: int = 10) -> None:
    for _ in range(n):  # event-loop turns, not time: the queued tasks reach the semaphore
        await asyncio.sleep(0)


async def test_a_full_queue_refuses_at_once_and_frees_as_it_drains():
    admission = Admission(1, max_queued=2)
    entered: list[int] = []

    async def run(i: int) -> None:
        async with admission.slot():
            entered.append(i)

    async with admission.slot():
        queued = [asyncio.create_task(run(i)) for i in range(2)]
        await _turns()
        assert admission.waiting == 2
        with pytest.raises(Overloaded) as refused:
            async with admission.slot():
                pass
        assert admission.waiting == 2  # the refused request never joined the queue
    await asyncio.gather(*queued)
    assert entered == [0, 1]  # first come, first served
    code, message = _status_for(refused.value)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in about" in message
    async with admission.slot():  # room again
        pass
