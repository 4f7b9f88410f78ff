"""Fused, pre-packed linear layers for the flattened runner.

On CPU in float32, MKL's sgemm gets several times slower per row as the row count goes from
1 to a handful (measured on SmolLM2's shapes: [6,576]x[576,576] took 5x the time of one
row), which is exactly the verification shape (k+1 rows per sequence). oneDNN with the
weight reordered once at load time keeps the cost nearly flat in the row count and is
about 2x faster at one row. Fusing q/k/v and gate/up into one product halves the calls.
Elsewhere (CUDA, other dtypes, quantized modules) the plain path is used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows the packed layout is tuned for; any row count works.
_PACK_ROWS = 8


def _onednn_available() -> bool:
    return (hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]  # unannotated in torch


class FusedLinear:
    """y = x @ concat(W_i).T + concat(b_i): several nn.Linear layers as one product."""

    def __init__(self, modules: list[torch.nn.Module], pack: bool = True) -> None:
        self.modules = modules
        self.sizes = [getattr(m, "out_features", 0) for m in modules]
        linears = [m for m in modules if type(m) is torch.nn.Linear]
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.packed = False
        if len(linears) != len(modules):
            return  # e.g. int8 weight-only modules: call them one by one
        weight = torch.cat([m.weight.detach() for m in linears])
        if any(m.bias is not None for m in linears):
            self.bias = torch.cat([m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                                   for m in linears])
        use_onednn = pack and weight.device.type == "cpu" and weight.dtype == torch.float32 and _onednn_available()
        if use_onednn:
            self.weight, self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS), True
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return torch.cat([m(x) for m in self.modules], dim=-1)
        if self.packed:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return out
        return F.linear(x, self.weight, self.bias)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(y, self.sizes, dim=-1)
