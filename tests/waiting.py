"""Waiting for a condition instead of sleeping a guessed time.

In one process, tests wait on an event (threading / asyncio) or, inside one event loop, on
the condition itself a loop turn at a time (`until`). Where the condition lives in another
process (Redis, a child's log or scrape endpoint) they poll it with a deadline
(`wait_until`, `eventually`): the interval only bounds how often it is read, never how long
anything is assumed to take.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "the condition"
) -> T:
    """Poll `condition` until it returns something truthy (returned); fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def eventually(check: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.1) -> T:
    """Retry `check` while it raises AssertionError; its last failure is raised at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(interval_s)


async def until(condition: Callable[[], object], timeout_s: float = 10.0, what: str = "the condition") -> None:
    """Within one event loop: yield a loop turn at a time until `condition()` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0)
