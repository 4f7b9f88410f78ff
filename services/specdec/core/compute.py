"""The one thread that runs torch in this process.

torch's CPU kernels run on OpenMP, and libgomp keeps a separate thread team for every
Python thread that runs a parallel op. Once two threads have done so, the process holds
more OpenMP threads than cores and libgomp throttles its spin-waits for every team, for
the rest of the process's life. Measured on 2 cores: one SmolLM2 forward pass over 8
sequences took 52 ms, and 100 ms after a single matmul had run on a second thread.

So model loading, every batch and every other sizeable tensor op go through this single
thread, and the event loop and gRPC threads only move bytes.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_lock = threading.Lock()
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_thread_id: int | None = None


def _remember_thread() -> None:
    global _thread_id
    _thread_id = threading.get_ident()


def executor() -> concurrent.futures.Executor:
    """The process-wide compute thread (created on first use)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="torch", initializer=_remember_thread
            )
        return _executor


def on_compute_thread() -> bool:
    return threading.get_ident() == _thread_id


def run_sync(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run fn on the compute thread and wait for it (inline when already there).

    Blocks the caller: call it at start-up or from plain threads, not from a running
    event loop (use `loop.run_in_executor(executor(), ...)` there)."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    return executor().submit(fn, *args, **kwargs).result()


def _reset_after_fork() -> None:
    # A forked child inherits the executor object but not its thread.
    global _executor, _thread_id
    _executor, _thread_id = None, None


os.register_at_fork(after_in_child=_reset_after_fork)
