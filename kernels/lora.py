"""Batched LoRA: every row of a step gets the low-rank delta of its own adapter, in one call per projection.

    out[n] += scaling[l] · (x[n] @ A[l]ᵀ) @ B[l]ᵀ,   l = adapter_index[n]; rows with l = -1 are left alone

A (L, R, H) and B (L, OUT, R) stack the L adapters (smaller ranks zero-padded to R: exact). A model's
linear layer calls `add_lora(out, x, A, B, rows)` right after its base matmul, for the rows of every
expert at once; `rows = LoRARows.from_index(adapter_index, L)` is built once per step and shared by all
projections. Backends: "torch" (the reference: one matmul pair per adapter over its gathered rows) and
"triton" (kernels/lora_triton.py, SGMV-style tiles); "auto": triton on CUDA, else torch. On CPU the
engine's steps of up to 256 rows take `packed_linear.packed_lora_linear` instead, which folds the
shrinks into the base layer's GEMM (engine/lora.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .lora_triton import LoRATiles, add_lora_triton, lora_tiles
from .validate import describe, is_integer

BACKENDS = ("auto", "torch", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class LoRARows:
    """A step's rows by adapter: `adapter_index` (N,) int64 in [-1, L), grouped on first use."""

    adapter_index: Tensor
    num_adapters: int
    _tiles: LoRATiles | None = field(default=None, repr=False)
    _groups: list[tuple[int, slice | Tensor]] | None = field(default=None, repr=False)

    @classmethod
    def from_index(cls, adapter_index: Tensor, num_adapters: int) -> LoRARows:
        """Checks `adapter_index` (its values only off CUDA, where that would cost a sync)."""
        if not isinstance(num_adapters, int) or num_adapters < 1:
            raise ValueError(f"num_adapters must be a positive int, got {num_adapters!r}")
        if not isinstance(adapter_index, Tensor) or adapter_index.dim() != 1:
            raise ValueError(f"adapter_index must be a (N,) tensor, got {describe(adapter_index)}")
        if not is_integer(adapter_index.dtype):
            raise ValueError(f"adapter_index must have an integer dtype, got {adapter_index.dtype}")
        index = adapter_index.to(torch.int64)
        if not index.is_cuda and len(index):
            low, high = int(index.min()), int(index.max())
            if low < -1 or high >= num_adapters:
                raise ValueError(f"adapter_index must be in [-1, {num_adapters}), got values {low}..{high}")
        return cls(index, num_adapters)

    @property
    def tiles(self) -> LoRATiles:
        """The Triton tile table, built on first use (on device, no sync) and shared by the step."""
        if self._tiles is None:
            self._tiles = lora_tiles(self.adapter_index, self.num_adapters)
        return self._tiles

    def groups(self) -> list[tuple[int, slice | Tensor]]:
        """(adapter, its rows) for each adapter with rows: a slice when they are consecutive (no gather),
        else their ids. Computed once per step, on first use (it syncs on CUDA; the Triton path skips it)."""
        if self._groups is None:
            self._groups = []
            for adapter in range(self.num_adapters):
                ids = (self.adapter_index == adapter).nonzero().squeeze(1)
                if len(ids):
                    first, last = int(ids[0]), int(ids[-1])
                    consecutive = last - first + 1 == len(ids)
                    self._groups.append((adapter, slice(first, last + 1) if consecutive else ids))
        return self._groups


def add_lora(out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, rows: LoRARows | Tensor, *,
             scaling: Tensor | None = None, backend: str = "auto") -> Tensor:
    """out (N, OUT) += scaling[l] · x (N, H) @ lora_a[l]ᵀ (H, R) @ lora_b[l]ᵀ (R, OUT) per row, in place.

    lora_a (L, R, H), lora_b (L, OUT, R) in x's dtype; `rows`: a `LoRARows` or the (N,) adapter index
    (-1: no adapter); scaling (L,) fp32, None for 1 (scaling already folded into lora_b). Returns out.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(lora_a, Tensor) and lora_a.dim() == 3 and not isinstance(rows, LoRARows):
        rows = LoRARows.from_index(rows, lora_a.shape[0])
    scaling = check_lora_args(out, x, lora_a, lora_b, rows, scaling)
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend == "torch":
        return add_lora_torch(out, x, lora_a, lora_b, rows, scaling)
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    return add_lora_triton(out, x, lora_a, lora_b, rows.tiles, scaling)


def add_lora_torch(out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, rows: LoRARows,
                   scaling: Tensor) -> Tensor:
    """The reference: for each adapter, take its rows, two matmuls, add into out."""
    for adapter, selected in rows.groups():
        delta = F.linear(F.linear(x[selected], lora_a[adapter]), lora_b[adapter]) * scaling[adapter]
        delta = delta.to(out.dtype)
        if isinstance(selected, slice):
            out[selected] += delta
        else:  # index_put_: index_add_ was measured far slower on contended CPU threads (torch 2.13)
            out.index_put_((selected,), delta, accumulate=True)
    return out


def check_lora_args(out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, rows: LoRARows,
                    scaling: Tensor | None) -> Tensor:
    """Shapes, dtypes, devices and last-dim contiguity; returns scaling as (L,) fp32 (ones for None)."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"x must be a (N, H) float32/bfloat16/float16 tensor, got {describe(x)}")
    num_rows, hidden = x.shape
    if not isinstance(lora_a, Tensor) or lora_a.dim() != 3 or lora_a.shape[2] != hidden:
        raise ValueError(f"lora_a must be (L, R, H={hidden}), got {describe(lora_a)}")
    num_adapters, rank, _ = lora_a.shape
    if not isinstance(lora_b, Tensor) or lora_b.dim() != 3 or lora_b.shape[::2] != (num_adapters, rank):
        raise ValueError(f"lora_b must be (L={num_adapters}, OUT, R={rank}), got {describe(lora_b)}")
    if not isinstance(out, Tensor) or out.shape != (num_rows, lora_b.shape[1]):
        raise ValueError(f"out must be (N={num_rows}, OUT={lora_b.shape[1]}), got {describe(out)}")
    for name, tensor in (("lora_a", lora_a), ("lora_b", lora_b), ("out", out)):
        if tensor.dtype != x.dtype or tensor.device != x.device:
            raise ValueError(
                f"{name} must be {x.dtype} on {x.device} like x, got {tensor.dtype} on {tensor.device}")
    for name, tensor in (("x", x), ("lora_a", lora_a), ("lora_b", lora_b), ("out", out)):
        if tensor.numel() and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {tensor.stride()}")
    if rows.num_adapters != num_adapters or rows.adapter_index.shape != (num_rows,):
        raise ValueError(f"rows must index N={num_rows} rows over L={num_adapters} adapters, got "
                         f"{tuple(rows.adapter_index.shape)} rows over {rows.num_adapters}")
    if rows.adapter_index.device != x.device:
        raise ValueError(f"adapter_index must be on x's device {x.device}, got {rows.adapter_index.device}")
    if scaling is None:
        return torch.ones(num_adapters, dtype=torch.float32, device=x.device)
    if not isinstance(scaling, Tensor) or scaling.shape != (num_adapters,) or scaling.device != x.device:
        raise ValueError(f"scaling must be a ({num_adapters},) tensor on {x.device}, "
                         f"got {describe(scaling)}")
    return scaling.to(torch.float32).contiguous()

