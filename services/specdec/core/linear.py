"""Fused, pre-packed linear layers for the flattened runner.

On CPU in float32, MKL's sgemm gets several times slower per row as the row count goes from
1 to a handful (measured on SmolLM2's shapes: [6,576]x[576,576] took 5x the time of one
row), which is exactly the verification shape (k+1 rows per sequence). oneDNN with the
weight reordered once at load time keeps the cost nearly flat in the row count and is
about 2x faster at one row. On another CPU (a Xeon with AVX-512 and AMX) the packed path
was slower instead. So neither is assumed: for each weight shape, both are timed once at
load on this machine, at the row counts decoding and verification use, and the faster one
is kept. Fusing q/k/v and gate/up into one product halves the calls. Elsewhere (CUDA,
other dtypes, quantized modules) the plain path is used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
# Rows the packed layout is tuned for; any row count works.
_PACK_ROWS = 8
# Row counts a pass feeds a linear layer: one decoding sequence, a verified draft, a batch.
TIMED_ROWS = (1, 4, 16)
TIMED_REPEATS = 15  # best of: a busy machine's stalls do not decide
_packing_pays: dict[tuple[int, int], bool] = {}  # weight shape -> packed was faster, measured here


def _onednn_available() -> bool:
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]  # unannotated in torch


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
            self.bias = torch.cat(
                [m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features) for m in linears]
            )
        use_onednn = pack and weight.device.type == "cpu" and weight.dtype == torch.float32 and _onednn_available()
        if use_onednn:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS)
            if packing_pays(weight, packed, self.bias):
                self.weight, self.packed = packed, True
                return
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


def packing_pays(weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN with the packed weight beats a plain F.linear for this shape on this
    machine: both timed, interleaved, at TIMED_ROWS (best of TIMED_REPEATS each); measured
    once per shape per process."""
    shape = (weight.shape[0], weight.shape[1])
    if shape not in _packing_pays:
        plain_s = packed_s = 0.0
        with torch.inference_mode():
            for rows in TIMED_ROWS:
                x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)

                def plain(x: torch.Tensor = x) -> object:
                    return F.linear(x, weight, bias)

                def onednn(x: torch.Tensor = x) -> object:
                    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

                plain(), onednn()  # warm both (oneDNN makes a primitive per row count)
                plain_best, packed_best = _best_of_interleaved(plain, onednn)
                plain_s += plain_best
                packed_s += packed_best
        _packing_pays[shape] = packed_s < plain_s
        log.info(
            "linear %s: packed %.3f ms, plain %.3f ms over rows %s: %s",
            shape,
            packed_s * 1e3,
            plain_s * 1e3,
            TIMED_ROWS,
            "packed" if _packing_pays[shape] else "plain",
        )
    return _packing_pays[shape]


def _best_of_interleaved(a: Callable[[], object], b: Callable[[], object]) -> tuple[float, float]:
    """The best time of each over TIMED_REPEATS rounds, alternating, so drift hits both."""
    best = [float("inf"), float("inf")]
    for _ in range(TIMED_REPEATS):
        for i, fn in enumerate((a, b)):
            started = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - started)
    return best[0], best[1]
