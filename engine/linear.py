"""Linear layers that, for inference on CPU in fp32, multiply by a weight packed once.

A decode step multiplies few rows (the batch) by every weight, so its speed is that of reading the
weights. Up to `PACKED_MAX_ROWS` rows, `fast_linear` runs our weight-streaming GEMM
(`mope.kernels.packed_linear`, AVX-512 or AVX2: 1.1-1.5x MKL's packed sgemm at 4-32 rows on Intel with
AVX-512, 2-4x on AMD Zen 3, bench/README.md), or on CPUs with neither MKL's prepacked GEMM
(`cblas_sgemm_compute`: 2x plain sgemm at 8 rows, 1.3x at 32).
The packed copy costs as much memory as the weight (ours: plus at most 2 MB, its last huge page); it is
made on first use and remade when the weight changes (its version counter moves: an optimizer step, a
LoRA merge). With autograd on, on other devices or dtypes, for more rows, or for weights made in inference
mode (no version counter), it is plain F.linear.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from mope.kernels import decode_layers, packed_linear
from torch import Tensor, nn

PACKED_MAX_ROWS = packed_linear.MAX_ROWS
MKL_PACK_ROWS = 32  # the row count MKL is told when packing; the packed weight serves any count
# id(weight) -> (a weak reference to it, its version when packed, the packed copy); the entry leaves with
# the weight. A plain dict: torch's WeakIdKeyDictionary makes a weak reference on every lookup, which cost
# ~4 us a call in a decode step, whose GEMMs had just evicted Python's objects (bench/README.md).
_packed: dict[int, tuple[weakref.ref, int, packed_linear.PackedWeight | Tensor]] = {}
_HAS_MKL = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
# id(module) -> (a weak reference to it, the (packed, bias, expand) its projection was made of, the
# projection for decode_layers): `kept_projection`
_projections: dict[int, tuple[weakref.ref, tuple, object]] = {}


def fast_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), through a packed copy of the weight when that applies (see module doc)."""
    if not takes_packed_path(x, weight):
        return F.linear(x, weight, bias)
    if packed_linear.available():
        return packed_linear.packed_linear(x, packed_weight(weight), bias)
    return torch.ops.mkl._mkl_linear(x, packed_weight(weight), weight, bias, x.shape[0])


def takes_packed_path(x: Tensor, weight: Tensor) -> bool:
    """Whether `fast_linear(x, weight)` multiplies by a packed copy of the weight."""
    return x.dim() == 2 and rows_take_packed_path(x.shape[0], x.device, x.dtype, weight)


def rows_take_packed_path(rows: int, device: torch.device, dtype: torch.dtype, weight: Tensor) -> bool:
    """`takes_packed_path` for an x of `rows` rows of `dtype` on `device`."""
    return (
        rows <= PACKED_MAX_ROWS
        and device.type == "cpu"
        and dtype == weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not weight.is_inference()
        and (_HAS_MKL or packed_linear.available())
    )


def packed_weight(weight: Tensor) -> packed_linear.PackedWeight | Tensor:
    """The packed copy of `weight` for this machine's kernel (ours, else MKL's), made once per weight
    version."""
    key = id(weight)
    entry = _packed.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == weight._version:
        return entry[2]
    packed = (packed_linear.pack_weight(weight) if packed_linear.available()
              else torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), MKL_PACK_ROWS))
    # the callback runs when the weight dies; it is bound to this dict (no global lookup then, e.g. at exit)
    ref = weakref.ref(weight, lambda _, cache=_packed: cache.pop(key, None))
    _packed[key] = (ref, weight._version, packed)
    return packed


class Linear(nn.Linear):
    """nn.Linear (same parameters, same forward hooks) computed by `fast_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_linear(x, self.weight, self.bias)

    def decode_projection(self, x: Tensor):
        """This layer for `decode_layers` when `fast_linear` would run our packed kernel on x, else None."""
        if not (packed_linear.available() and takes_packed_path(x, self.weight)):
            return None
        return kept_projection(self, self.weight, self.bias)


def kept_projection(module: nn.Module, weight: Tensor, bias: Tensor | None,
                    expand: packed_linear.PackedExpand | None = None):
    """`decode_layers.projection` of `weight` packed, `bias` and `expand`, kept for `module` while they are
    the same objects (a new weight version is a new packed copy; the projection reads the bias in place): a
    decode step asks each projection for it, right after GEMMs evicted Python's objects (bench/README.md).
    Kept beside the module, not on it: a module stays copyable and picklable."""
    packed = packed_weight(weight)
    key, made_of = id(module), (packed, bias, expand)
    entry = _projections.get(key)
    stale = entry is None or entry[0]() is not module
    if stale or any(a is not b for a, b in zip(entry[1], made_of, strict=True)):
        ref = weakref.ref(module, lambda _, cache=_projections: cache.pop(key, None))
        entry = _projections[key] = (ref, made_of, decode_layers.projection(packed, bias, expand))
    return entry[2]
