"""Weight-only int8 Linear layers: a cheap draft made from the target itself.

Drafting on a CPU is bound by reading weights; int8 weights with one float scale per
output channel read 4x fewer bytes than float32 while the activations stay in bfloat16,
so the draft keeps the target's behaviour closely (unlike dynamic int8 quantization,
which also quantizes activations and loses most of SmolLM2's agreement).
"""

from __future__ import annotations

from typing import TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)


class Int8WeightOnlyLinear(torch.nn.Module):
    weight_int8: torch.Tensor  # buffers, registered in __init__
    scale: torch.Tensor

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out_features]
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).to(torch.int8))  # [out, in]
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float())
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_linear_weights(module: M) -> M:
    """Replace every nn.Linear below `module` (in place) with its int8 weight-only twin."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Int8WeightOnlyLinear(child))
        else:
            quantize_linear_weights(child)
    return module
