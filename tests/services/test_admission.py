"""Admission control at the coordinator: at most max_running_requests run at once, the
rest queue (first come, first served) and still get exact output."""

from __future__ import annotations

import asyncio

import pytest

from specdec.client import AsyncClient
from specdec.coordinator.admission import Admission
from tests.services.conftest import ngram_stream, start
from tests.waiting import until


async def test_admission_runs_at_most_the_limit_and_queues_the_rest() -> None:
    admission = Admission(2)
    release = asyncio.Event()
    running, order = 0, []

    async def request(i: int) -> None:
        nonlocal running
        async with admission.slot():
            running += 1
            order.append(i)
            await release.wait()
            running -= 1

    tasks = [asyncio.create_task(request(i)) for i in range(5)]
    # Every request has reached the admission: it either runs or waits (whichever it is).
    await until(lambda: running + admission.waiting == 5, what="all five requests to arrive")
    assert running == 2 and admission.waiting == 3 and order == [0, 1]
    tasks[4].cancel()  # a client that gives up while queued leaves the queue
    await asyncio.wait([tasks[4]])
    assert tasks[4].cancelled() and admission.waiting == 2
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 2, 3] and admission.waiting == 0 and running == 0
    with pytest.raises(ValueError, match="max_running_requests"):
        Admission(0)


async def test_requests_past_the_limit_queue_and_stay_exact(tiny_models, valkey, prompt_ids, reference):
    stack = start(tiny_models[0], "ngram", valkey, extra_env={"SPECDEC_MAX_RUNNING_REQUESTS": "1"})
    try:
        async with AsyncClient(stack.address, timeout_s=120) as client:
            results = await asyncio.gather(*(ngram_stream(client, prompt_ids) for _ in range(4)))
    finally:
        stack.stack.stop()
    assert all(ids == reference for ids, _ in results)
    # One request at a time: every verify pass held a single session.
    assert all(batch == 1.0 for _, batch in results), results
