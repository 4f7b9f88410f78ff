"""Counter-based randomness.

Every random number is a pure function of (seed, position, purpose): no generator state
to carry, so a session resumed on another replica, or replayed after a failover, draws
exactly the same numbers. The session's identity enters through its seed (a random one is
drawn and recorded when the caller gives none), so two requests with the same seed and
input give the same output, as callers of OpenAI-style APIs expect.
"""

from __future__ import annotations

import hashlib
import struct
from enum import IntEnum

import torch

_MASK64 = (1 << 64) - 1


class Purpose(IntEnum):
    DRAFT = 1  # the drafter's sample of a draft token
    ACCEPT = 2  # the uniform of the acceptance test
    RESAMPLE = 3  # the target's own token (recovered or bonus)


def uniform(seed: int, position: int, purpose: Purpose, index: int = 0) -> float:
    """A uniform float in [0, 1) determined by its key alone (blake2b, 53 bits). `index`
    tells apart several draws of one purpose at one position (a token tree's siblings);
    index 0 is the key without it, so a chain draws what it always drew."""
    key = struct.pack("<QQQ", seed & _MASK64, position & _MASK64, int(purpose))
    if index:
        key += struct.pack("<Q", index & _MASK64)
    digest = hashlib.blake2b(key, digest_size=8, person=b"specdec-rng-v1").digest()
    return (int.from_bytes(digest, "little") >> 11) * (1.0 / (1 << 53))


def sample_index(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF sample from a 1-D distribution with the uniform u.

    Zero-probability entries are never chosen (searchsorted on the right edge skips them).
    """
    cdf = torch.cumsum(probs.to(torch.float64), dim=0)
    target = torch.tensor([u * float(cdf[-1])], dtype=torch.float64, device=cdf.device)
    idx = int(torch.searchsorted(cdf, target, right=True)[0])
    if idx >= probs.shape[0] or probs[idx] <= 0:
        idx = int(torch.nonzero(probs > 0)[-1, 0])  # u*total rounded up to the very end
    return idx
