"""fp32 linear for few rows on CPU: a weight-streaming GEMM over a packed weight (csrc/packed_linear.cpp).

A decode step multiplies a handful of rows by every weight, so its speed is the speed of reading the
weights. `pack_weight(w)` lays W out as 32-output panels read in one sequential, prefetched stream;
`packed_linear(x, packed, bias)` then computes x @ Wᵀ + bias for up to `MAX_ROWS` rows, and
`packed_lora_linear` the same layer plus each row's own LoRA adapter (the engine's CPU path for adapter
experts, engine/lora.py). Measured against MKL's packed sgemm in bench/README.md (`bench/linear.py`).
The torch reference is `F.linear`. The kernel runs in AVX-512 where the CPU has it, else in AVX2 with FMA
(`instruction_sets()`); `available()` is False without a C++ compiler or without either; callers then use
F.linear (or MKL's packed GEMM).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .cpp_build import load_cpp
from .validate import describe, is_integer

PANEL = 32  # outputs per panel of a packed weight
MAX_ROWS = 256  # measured 1.2x sgemm at 128-256 rows, 0.9x at 512 (its blocking wins larger products)


@functools.cache
def available() -> bool:
    """Whether the C++ kernel is built and this CPU runs it."""
    module = load_cpp("packed_linear")
    return module is not None and module.supported()


def instruction_sets() -> list[str]:
    """The forms of the kernel this CPU runs, best first: "avx512" (a micro-kernel holds 12 rows x 32
    outputs), "avx2" (AVX2 + FMA: 6 rows x 16 outputs); MOPE_DISABLE_AVX512=1 leaves out "avx512"."""
    return load_cpp("packed_linear").isas() if available() else []


def instruction_set() -> str:
    """The form the kernel runs now (the first of `instruction_sets()` unless set)."""
    _require_available()
    return load_cpp("packed_linear").isa()


def set_instruction_set(name: str) -> None:
    """Run the kernel in `name`, one of `instruction_sets()`, from now on (process-wide: for tests and
    benchmarks that compare the forms; results agree to fp32 rounding, not bit for bit)."""
    _require_available()
    load_cpp("packed_linear").set_isa(name)


@contextlib.contextmanager
def using_instruction_set(name: str) -> Iterator[None]:
    """`set_instruction_set(name)` inside the block; the form before it again after, however it ends."""
    before = instruction_set()
    set_instruction_set(name)
    try:
        yield
    finally:
        set_instruction_set(before)


class PackedWeight(NamedTuple):
    """A weight as `packed_linear` reads it (from `pack_weight`)."""

    panels: Tensor  # (ceil(N / 32), K, 32): panel p holds outputs 32p .. 32p + 31, zeros past N
    out_features: int  # N


def pack_weight(weight: Tensor) -> PackedWeight:
    """(N, K) fp32 CPU weight -> its 32-output panels, for `packed_linear`."""
    _require_available()
    return PackedWeight(load_cpp("packed_linear").pack_weight(weight.detach()), weight.shape[0])


def packed_linear(x: Tensor, packed: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """x (M, K) @ Wᵀ + bias -> (M, N) fp32, W given as `pack_weight(W)`; M <= MAX_ROWS."""
    _require_available()
    panels, out_features = _checked_packed(packed)
    return load_cpp("packed_linear").packed_linear(_checked_rows(x), panels, out_features, bias)


class PackedExpand(NamedTuple):
    """LoRA expand factors as `packed_lora_linear` reads them (from `pack_lora_expand`)."""

    panels: Tensor  # (sum of the spans, 32): per panel and adapter, its nonzero columns' 32 outputs
    k_ranges: Tensor  # (panels, L, 2) int64: the span [lo, hi) of adapter l's columns nonzero in a panel
    width: int  # columns per adapter (the rank, or the shards' ranks side by side)
    out_features: int  # the layer's outputs (OUT)


def pack_lora_expand(weight: Tensor, num_adapters: int) -> PackedExpand:
    """The expand factors [B_0 .. B_{L-1}] side by side, (OUT, L * width) fp32, for `packed_lora_linear`:
    per 32-output panel and adapter, only the span of columns nonzero there (a fused projection's B is
    block-diagonal over its shards: the rest is never read; smaller ranks' zero padding neither)."""
    _require_available()
    if num_adapters < 1 or weight.dim() != 2 or weight.shape[1] % num_adapters:
        raise ValueError(f"weight must be (OUT, L * width) for L = {num_adapters} adapters, "
                         f"got {describe(weight)}")
    weight = weight.detach()
    panels = -(-weight.shape[0] // PANEL)
    nonzero = torch.zeros(panels * PANEL, weight.shape[1], dtype=torch.bool)
    nonzero[: weight.shape[0]] = weight != 0
    nonzero = nonzero.view(panels, PANEL, num_adapters, -1).any(dim=1)  # (panels, L, width)
    width = nonzero.shape[2]
    columns = torch.arange(width)
    lo = torch.where(nonzero, columns, width).amin(dim=2)
    hi = torch.where(nonzero, columns + 1, 0).amax(dim=2)
    k_ranges = torch.stack([lo.clamp(max=hi), hi], dim=2).contiguous()
    panels = load_cpp("packed_linear").pack_expand(weight, k_ranges)
    return PackedExpand(panels, k_ranges, width, weight.shape[0])


def packed_lora_linear(x: Tensor, folded: PackedWeight, bias: Tensor | None, adapter_index: Tensor,
                       expand: PackedExpand) -> Tensor:
    """Batched LoRA over a linear layer in one call: row n gets x[n] @ Wᵀ + bias + x[n] @ A_lᵀ @ B_lᵀ for
    l = adapter_index[n] (-1: the plain layer) -> (M, OUT).

    folded = pack_weight([W; A_0; ..; A_{L-1}]) (the A factors, (width, K) each, appended as extra output
    rows: the same GEMM gives every adapter's shrink); expand = pack_lora_expand([B_0 .. B_{L-1}], L);
    bias (OUT,) or None. Each row reads only its own adapter's expand columns, added to its
    outputs inside the GEMM.
    """
    _require_available()
    x = _checked_rows(x)
    panels, out_features, bias, expand_panels, k_ranges, width = lora_weight_args(folded, bias, expand)
    return load_cpp("packed_linear").packed_lora_linear(x, panels, out_features, bias,
                                                        lora_index(x.shape[0], adapter_index), expand_panels,
                                                        k_ranges, width)


def lora_weight_args(folded: PackedWeight, bias: Tensor | None, expand: PackedExpand) -> tuple:
    """`packed_lora_linear`'s weights, checked, as the C++ takes them: (panels, out_features, bias, expand
    panels, k_ranges, width)."""
    panels, folded_rows = _checked_packed(folded, "folded")
    if not isinstance(expand, PackedExpand):
        raise ValueError(f"expand must come from pack_lora_expand, got {type(expand).__name__}")
    num_adapters = expand.k_ranges.shape[1]
    out_features = folded_rows - num_adapters * expand.width
    if out_features != expand.out_features:
        raise ValueError(f"folded has {out_features} + {num_adapters} · {expand.width} rows (W's outputs + "
                         f"the adapters' A), expand has {expand.out_features} outputs: pack one layer's "
                         "[W; A_0; ..]")
    return panels, out_features, bias, expand.panels, expand.k_ranges, expand.width


def lora_index(rows: int, adapter_index: Tensor) -> Tensor:
    """`adapter_index` (rows,) checked, as the C++ takes it: int64, contiguous (the C++ checks its values)."""
    if not isinstance(adapter_index, Tensor) or adapter_index.shape != (rows,):
        raise ValueError(f"adapter_index must be ({rows},), got {describe(adapter_index)}")
    if not is_integer(adapter_index.dtype):  # .to(int64) would truncate it
        raise ValueError(f"adapter_index must have an integer dtype, got {adapter_index.dtype}")
    return adapter_index.to(torch.int64).contiguous()


def _checked_packed(packed: PackedWeight, name: str = "packed") -> PackedWeight:
    if not isinstance(packed, PackedWeight):
        raise ValueError(f"{name} must come from pack_weight, got {type(packed).__name__}")
    return packed


def _checked_rows(x: Tensor) -> Tensor:
    """x as the kernels take it; packed weights and biases are checked in C++ (a ValueError naming them)."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError(f"x must be a 2-D float32 CPU tensor, got {describe(x)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"x has {x.shape[0]} rows; packed_linear serves at most {MAX_ROWS} (use F.linear)")
    return x.contiguous()


def _require_available() -> None:
    if not available():
        raise RuntimeError("packed_linear needs the C++ kernel (a compiler) and a CPU with AVX-512 or AVX2 "
                           "and FMA; use F.linear")

