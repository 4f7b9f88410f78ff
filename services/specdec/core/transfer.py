"""The verification path's device<->host copies, in one place so they can be counted.

On an accelerator every device->host read waits for the queued kernels (a sync), so the
verifier reads back a constant number of tensors per verify batch, however many items and
draft tokens it judges; tests assert that through these counters on CPU, where the same
calls are plain copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TransferStats:
    """Running totals of the copies made through this module (tests read differences)."""

    to_host: int = 0  # device->host reads (each one a sync on an accelerator)
    to_device: int = 0  # host->device copies of index and uniform tensors


STATS = TransferStats()


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor on the CPU (a no-op copy there, a sync on an accelerator)."""
    STATS.to_host += 1
    return tensor.cpu()


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor moved to the logits' device. To a GPU from pinned memory without
    waiting: a plain copy from pageable memory synchronizes the stream, so the first one
    would wait for the forward pass (PyTorch's pinned-memory cache keeps the staging
    buffer until the copy is done)."""
    STATS.to_device += 1
    if device.type == "cuda" and values.device.type == "cpu":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def to_device_split(
    parts: list[list[int]] | list[list[float]], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Several host lists as tensors on `device`, in one copy (then views of it)."""
    flat = torch.tensor([x for part in parts for x in part], dtype=dtype)
    return list(torch.split(to_device(flat, device), [len(part) for part in parts]))
