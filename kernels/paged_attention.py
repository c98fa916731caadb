"""Paged decode attention: one new query token per sequence against its K/V in a paged cache.

Backends: "torch" (reference, gather + softmax), "cpu" (csrc/paged_attention.cpp), "triton"
(kernels/paged_attention_triton.py). "auto": triton on CUDA, cpu on CPU (torch if the C++ build fails).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .validate import describe

BACKENDS = ("auto", "torch", "cpu", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    *,
    scale: float,
    backend: str = "auto",
) -> Tensor:
    """softmax(q · Kᵀ · scale) · V over each sequence's first `context_lens[b]` cached tokens.

    q (B, Hq, D); k_cache, v_cache (num_blocks, block_size, Hkv, D), the block dim with any stride;
    block_tables (B, max_blocks) int32; context_lens (B,) int32 in [1, max_blocks * block_size].
    Query head h reads kv head h // (Hq // Hkv). Returns (B, Hq, D) in q's dtype.
    """
    check_paged_attention_args(q, k_cache, v_cache, block_tables, context_lens, scale)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "cpu"
    if backend == "cpu" and q.is_cuda:
        raise ValueError("backend='cpu' needs CPU tensors, got CUDA ones")
    module = _cpp_module() if backend == "cpu" else None
    if module is not None:  # checks context_lens and the block ids it reads itself, for free
        return module.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, float(scale))
    if not q.is_cuda:  # on CUDA the check would cost a device sync per call
        check_context(k_cache, block_tables, context_lens)
    if backend == "triton":
        from .paged_attention_triton import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    # "torch", or "cpu" without a C++ build (load_cpp has warned once)
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_decode_attention_torch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor, scale: float
) -> Tensor:
    """The reference: gather each sequence's K/V through its block table, softmax in fp32."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    for b, length in enumerate(context_lens.tolist()):
        blocks = block_tables[b, : -(-length // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:length].float().repeat_interleave(group, dim=1)  # (L, Hq, D)
        v = v_cache[blocks].flatten(0, 1)[:length].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out


def check_paged_attention_args(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor, scale: float
) -> None:
    """Shapes, dtypes and devices (the values of context_lens and block_tables: `check_context`)."""
    if not isinstance(q, Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a (B, Hq, D) tensor, got {describe(q)}")
    if q.dtype not in DTYPES:
        raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    batch, num_heads, head_dim = q.shape
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in its last dim, got strides {q.stride()}")
    if not isinstance(k_cache, Tensor) or k_cache.dim() != 4 or k_cache.shape[-1] != head_dim:
        raise ValueError(
            f"k_cache must be (num_blocks, block_size, Hkv, D={head_dim}), got {describe(k_cache)}"
        )
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"q's {num_heads} heads must be a multiple of k_cache's {num_kv_heads} kv heads")
    if not isinstance(v_cache, Tensor) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {describe(v_cache)}"
        )
    inner = (num_kv_heads * head_dim, head_dim, 1)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype != q.dtype or cache.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} on {q.device}, got {cache.dtype} on {cache.device}")
        if cache.stride()[1:] != inner:
            raise ValueError(
                f"{name} must be contiguous within a block (strides [1:] {inner}), got {cache.stride()}"
            )
    if not isinstance(block_tables, Tensor) or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be (B={batch}, max_blocks), got {describe(block_tables)}")
    if not isinstance(context_lens, Tensor) or context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be ({batch},), got {describe(context_lens)}")
    for name, tensor in (("block_tables", block_tables), ("context_lens", context_lens)):
        if tensor.dtype != torch.int32 or tensor.device != q.device:
            raise ValueError(f"{name} must be int32 on {q.device}, got {tensor.dtype} on {tensor.device}")
    if block_tables.stride(-1) != 1:
        raise ValueError(
            f"block_tables must be contiguous in its last dim, got strides {block_tables.stride()}"
        )
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, *,
             backend: str = "auto") -> None:
    """k_cache[slot // block_size, slot % block_size] = k, same for v: the new tokens' K/V (N, Hkv, D)
    into the paged cache at `slot_mapping` (N,) int64; the caches' block dim may have any stride.

    Backends: "torch" (indexing) and "cpu" (csrc/paged_attention.cpp: one call that copies the rows;
    the indexing is ~10 ops per layer). "auto": cpu on CPU unless k or v needs a gradient.
    """
    if backend not in ("auto", "torch", "cpu"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cpu', got {backend!r}")
    on_cpu = k.is_cpu and not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad))
    if backend == "cpu" and not on_cpu:
        raise ValueError("backend='cpu' needs CPU tensors without gradients")
    module = _cpp_module() if backend != "torch" and on_cpu else None
    if module is not None:  # checks shapes, dtypes and every slot itself
        module.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    if v_cache.shape[:2] != k_cache.shape[:2]:
        raise ValueError(f"v_cache must have k_cache's (blocks, block_size) = {tuple(k_cache.shape[:2])}, "
                         f"got {tuple(v_cache.shape)}")
    block_size, capacity = k_cache.shape[1], k_cache.shape[0] * k_cache.shape[1]
    checked = k.is_cpu and len(slot_mapping)  # on CUDA the check would cost a device sync per layer
    if checked and not 0 <= int(slot_mapping.min()) <= int(slot_mapping.max()) < capacity:
        raise ValueError(f"slot_mapping holds slots outside the cache's [0, {capacity}): {slot_mapping}")
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, offsets] = k
    v_cache[blocks, offsets] = v


def check_context(k_cache: Tensor, block_tables: Tensor, context_lens: Tensor) -> None:
    """context_lens in [1, max_blocks * block_size] and the block ids each sequence reads in range."""
    if not len(context_lens):
        return
    num_blocks, block_size = k_cache.shape[:2]
    capacity = block_tables.shape[1] * block_size
    if int(context_lens.min()) < 1 or int(context_lens.max()) > capacity:
        raise ValueError(
            f"context_lens must be in [1, max_blocks * block_size = {capacity}], got {context_lens}"
        )
    blocks_read = (context_lens.long() + block_size - 1) // block_size
    read = block_tables[torch.arange(block_tables.shape[1]) < blocks_read[:, None]]
    if int(read.min()) < 0 or int(read.max()) >= num_blocks:
        raise ValueError(
            f"block_tables holds block ids outside [0, num_blocks={num_blocks}) in its used entries"
        )


def _cpp_module():
    from .cpp_build import load_cpp

    return load_cpp("paged_attention")

