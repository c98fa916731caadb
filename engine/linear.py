"""Linear layers that, for inference on CPU in fp32, run through MKL's prepacked GEMM.

A decode step multiplies few rows (the batch) by every weight, so plain sgemm spends a good part of its
time re-packing the weight on each call; `cblas_sgemm_compute` on a weight packed once skips that.
Measured on a (3072, 768) weight, 1 thread: 2x faster at 8 rows, 1.2-1.3x at 32, even at 128, slower
at 512, hence only up to `PACKED_MAX_ROWS` rows (decode); the model's decode step at the llama-160m
shape, B=32: 1.3x faster. The packed copy costs as much memory as the weight; it is made on first use
and remade when the weight changes (its version counter moves: an optimizer step, a LoRA merge).
With autograd on, on other devices or dtypes, or for weights made in inference mode (no version
counter), it is plain F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

PACK_ROWS = 32  # the row count MKL is told when packing; the packed weight serves any count
PACKED_MAX_ROWS = 64
_packed = WeakIdKeyDictionary()  # weight -> (its version when packed, packed copy)
_HAS_MKL = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def fast_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), through MKL's prepacked weight when that applies (see module doc)."""
    if not (
        _HAS_MKL
        and x.dim() == 2
        and x.shape[0] <= PACKED_MAX_ROWS
        and x.is_cpu
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not weight.is_inference()
    ):
        return F.linear(x, weight, bias)
    entry = _packed.get(weight)
    if entry is None or entry[0] != weight._version:
        entry = (weight._version, torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), PACK_ROWS))
        _packed[weight] = entry
    return torch.ops.mkl._mkl_linear(x, entry[1], weight, bias, x.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, same forward hooks) computed by `fast_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_linear(x, self.weight, self.bias)
