"""Triton batched LoRA (Punica SGMV style): rows sorted by adapter, tiles of BLOCK_M rows of one adapter.

shrink: y[n] = x[n] @ A[l]ᵀ          (N, H) -> (N, R) fp32, one program per row tile, loop over H
expand: out[n] += s_l · y[n] @ B[l]ᵀ  (N, R) -> (N, OUT), one program per (row tile, BLOCK_O columns)
with l = adapter_index[n]; rows with l = -1 are never touched. The tile table (which adapter and which
sorted rows a program owns) is built on the device with no host sync (`lora_tiles`); the grid is the
upper bound cdiv(N, BLOCK_M) + L tiles, and programs past the last tile exit at once.
Both stages are tl.dot tiles (R is padded to ≥ 16 by masks) on operands upcast to fp32: "ieee" for fp32
inputs, "tf32" for bf16/fp16 ones, which tf32 holds exactly, so 16-bit inputs still run on tensor cores
with exact products (and Triton's interpreter, whose bf16 tl.dot is wrong in 3.9, computes the same).
The (N, R) fp32 intermediate is 4·N·R bytes, small next to reading A and B.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M = 16
BLOCK_H = 32  # 116-128 registers on sm_80/sm_90 (64: 213-219), ptxas report of kernels/aot.py
BLOCK_O = 64
NUM_WARPS = 4


class LoRATiles(NamedTuple):
    """Rows sorted by adapter and where each adapter's rows and tiles start; all on the rows' device."""

    order: Tensor  # (N,) int32: row ids sorted by adapter (stable), the -1 rows first
    seg_start: Tensor  # (L,) int32: first position in `order` of adapter l's rows
    seg_count: Tensor  # (L,) int32: adapter l's number of rows
    tile_end: Tensor  # (L,) int32: cumulative tiles of adapters 0..l
    max_tiles: int  # an upper bound of the number of tiles (the grid)


def lora_tiles(adapter_index: Tensor, num_adapters: int) -> LoRATiles:
    """The tile table of a step's rows; reuse it for every projection of the step."""
    index = adapter_index.to(torch.int64)
    counts = torch.zeros(num_adapters + 1, dtype=torch.int64, device=index.device)
    counts.scatter_add_(0, index + 1, torch.ones_like(index))
    starts = torch.cumsum(counts, 0) - counts
    tiles = (counts[1:] + BLOCK_M - 1) // BLOCK_M
    return LoRATiles(
        order=torch.argsort(index, stable=True).to(torch.int32),
        seg_start=starts[1:].to(torch.int32),
        seg_count=counts[1:].to(torch.int32),
        tile_end=torch.cumsum(tiles, 0).to(torch.int32),
        max_tiles=triton.cdiv(len(index), BLOCK_M) + num_adapters,
    )


@triton.jit
def _tile_rows(order_ptr, seg_start_ptr, seg_count_ptr, tile_end_ptr, L, BLOCK_L: tl.constexpr,
               BLOCK: tl.constexpr):
    """(adapter, row ids (BLOCK,), row mask) of this program's tile; no row past the last tile."""
    tile = tl.program_id(0)
    offs_l = tl.arange(0, BLOCK_L)
    tile_end = tl.load(tile_end_ptr + offs_l, mask=offs_l < L, other=2**30)
    adapter = tl.sum((tile_end <= tile).to(tl.int32), axis=0)
    past_last_tile = adapter >= L
    adapter = tl.minimum(adapter, L - 1)
    end = tl.load(tile_end_ptr + adapter)
    count = tl.load(seg_count_ptr + adapter)
    first = (tile - (end - (count + BLOCK - 1) // BLOCK)) * BLOCK + tl.arange(0, BLOCK)
    mask = first < tl.where(past_last_tile, 0, count)
    rows = tl.load(order_ptr + tl.load(seg_start_ptr + adapter) + first, mask=mask, other=0)
    return adapter.to(tl.int64), rows.to(tl.int64), mask


@triton.jit
def lora_shrink_kernel(
    x_ptr, a_ptr, y_ptr, order_ptr, seg_start_ptr, seg_count_ptr, tile_end_ptr, L, H, R,
    stride_xn, stride_al, stride_ar, stride_yn,
    BLOCK_L: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    adapter, rows, row_mask = _tile_rows(order_ptr, seg_start_ptr, seg_count_ptr, tile_end_ptr, L,
                                         BLOCK_L, BLOCK)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK, BLOCK_R), tl.float32)
    for start in range(0, H, BLOCK_H):
        offs_h = start + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + offs_h[None, :],
                    mask=row_mask[:, None] & (offs_h < H)[None, :], other=0.0)
        a = tl.load(a_ptr + adapter * stride_al + offs_r[None, :] * stride_ar + offs_h[:, None],
                    mask=(offs_r < R)[None, :] & (offs_h < H)[:, None], other=0.0)  # (BLOCK_H, BLOCK_R)
        acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision=PRECISION)
    tl.store(y_ptr + rows[:, None] * stride_yn + offs_r[None, :], acc,
             mask=row_mask[:, None] & (offs_r < R)[None, :])


@triton.jit
def lora_expand_kernel(
    y_ptr, b_ptr, scaling_ptr, out_ptr, order_ptr, seg_start_ptr, seg_count_ptr, tile_end_ptr, L, R, OUT,
    stride_yn, stride_bl, stride_bo, stride_on,
    BLOCK_L: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr,
):
    adapter, rows, row_mask = _tile_rows(order_ptr, seg_start_ptr, seg_count_ptr, tile_end_ptr, L,
                                         BLOCK_L, BLOCK)
    offs_r = tl.arange(0, BLOCK_R)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    y = tl.load(y_ptr + rows[:, None] * stride_yn + offs_r[None, :],
                mask=row_mask[:, None] & (offs_r < R)[None, :], other=0.0)
    b = tl.load(b_ptr + adapter * stride_bl + offs_o[None, :] * stride_bo + offs_r[:, None],
                mask=(offs_o < OUT)[None, :] & (offs_r < R)[:, None], other=0.0)  # (BLOCK_R, BLOCK_O)
    delta = tl.dot(y, b.to(tl.float32), input_precision=PRECISION) * tl.load(scaling_ptr + adapter)
    out_ptrs = out_ptr + rows[:, None] * stride_on + offs_o[None, :]
    out_mask = row_mask[:, None] & (offs_o < OUT)[None, :]
    out = tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, (out.to(tl.float32) + delta).to(out.dtype), mask=out_mask)


def add_lora_triton(out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, tiles: LoRATiles,
                    scaling: Tensor) -> Tensor:
    """out[n] += scaling[l] · x[n] @ A[l]ᵀ @ B[l]ᵀ for l = adapter of row n (checked inputs); returns out."""
    num_rows, hidden = x.shape
    num_adapters, rank, _ = lora_a.shape
    out_features = lora_b.shape[1]
    if num_rows == 0:
        return out
    y = torch.empty(num_rows, rank, dtype=torch.float32, device=x.device)
    block_r = max(16, triton.next_power_of_2(rank))
    block_l = triton.next_power_of_2(num_adapters)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    table = (tiles.order, tiles.seg_start, tiles.seg_count, tiles.tile_end, num_adapters)
    lora_shrink_kernel[(tiles.max_tiles,)](
        x, lora_a, y, *table, hidden, rank, x.stride(0), lora_a.stride(0), lora_a.stride(1), y.stride(0),
        BLOCK_L=block_l, BLOCK=BLOCK_M, BLOCK_H=BLOCK_H, BLOCK_R=block_r, PRECISION=precision,
        num_warps=NUM_WARPS,
    )
    lora_expand_kernel[(tiles.max_tiles, triton.cdiv(out_features, BLOCK_O))](
        y, lora_b, scaling, out, *table, rank, out_features, y.stride(0), lora_b.stride(0), lora_b.stride(1),
        out.stride(0), BLOCK_L=block_l, BLOCK=BLOCK_M, BLOCK_R=block_r, BLOCK_O=BLOCK_O, PRECISION=precision,
        num_warps=NUM_WARPS,
    )
    return out
