"""Which judge verifies a batch here: chosen by measuring both at load, not by a rule.

`rejection_sample_batch` reads the device back once per verify batch (what an accelerator
needs: no sync per draft token); `rejection_sample`, item by item, does less arithmetic and
wins on a CPU, where there is no sync to save. Both give the same tokens (tested), so the
choice only moves speed. It is made once per (device, vocabulary) in a process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from specdec.core.rejection import RejectionInput, RejectionOutput, rejection_sample, rejection_sample_batch
from specdec.core.sampling import SamplingParams

log = logging.getLogger(__name__)

Judge = Callable[[list[RejectionInput]], list[RejectionOutput]]


def _per_item(inputs: list[RejectionInput]) -> list[RejectionOutput]:
    return [rejection_sample(item) for item in inputs]


JUDGES: dict[str, Judge] = {"batched": rejection_sample_batch, "per_item": _per_item}
_CHOSEN: dict[tuple[str, int], str] = {}


def choose_judge(vocab_size: int, device: torch.device | str = "cpu") -> str:
    """The faster judge for this device and vocabulary (measured once, then remembered)."""
    key = (str(device), vocab_size)
    if key not in _CHOSEN:
        times = _measure(vocab_size, torch.device(device))
        _CHOSEN[key] = min(times, key=lambda name: times[name])
        log.info("verify judge on %s: %s (%s)", device, _CHOSEN[key], _describe(times))
    return _CHOSEN[key]


def _describe(times: dict[str, float]) -> str:
    return ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in times.items())


def _measure(vocab_size: int, device: torch.device, rounds: int = 3) -> dict[str, float]:
    """Best of `rounds` interleaved timings of each judge on one synthetic verify batch."""
    items = sample_batch(vocab_size, device)
    best = dict.fromkeys(JUDGES, math.inf)
    for _ in range(rounds):
        for name, judge in JUDGES.items():
            start = time.perf_counter()
            try:
                judge(items)  # ends in a host read: the time includes the device's work
            except (RuntimeError, TypeError) as exc:  # a judge that cannot run on this device
                log.warning("verify judge %s fails on %s: %s", name, device, exc)
                break
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def sample_batch(vocab_size: int, device: torch.device, items: int = 6, k: int = 4) -> list[RejectionInput]:
    """A verify batch like a busy replica's: greedy, sampled with an n-gram's one-hot draft
    and sampled with a draft model's q, in equal parts."""
    gen = torch.Generator().manual_seed(0)
    batch = []
    for b in range(items):
        logits = torch.randn(k + 1, vocab_size, generator=gen).to(device)
        draft = torch.randint(vocab_size, (k,), generator=gen).tolist()
        kind = b % 3
        sampling = SamplingParams() if kind == 0 else SamplingParams(temperature=0.8, seed=b)
        q = None
        if kind == 2:
            q = torch.softmax(torch.randn(k, vocab_size, generator=gen, dtype=torch.float64), dim=-1).to(device)
        batch.append(RejectionInput(logits, draft, q, sampling, 0))
    return batch
