"""Triton paged decode attention: one new query token per sequence against its paged K/V cache.

One program per (sequence, kv head) serves the kv head's whole group of query heads, so each cached
K/V row is read once per group (GQA), with an online softmax in fp32 over tiles of BLOCK_N tokens.
A tile gathers its tokens through the block table token by token (block id of t // block_size, slot
t % block_size), so any block size and any block stride work. Scores are broadcast products summed in
fp32 rather than tl.dot: the group is often < 16 rows (tensor-core tiles need 16) and a decode step is
bound by reading the cache, not by FLOPs.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE_ELEMENTS = 8192  # group x tokens x head_dim elements per broadcast tile
NUM_WARPS = 4


@triton.jit
def paged_decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr, out_ptr, scale,
    stride_qb, stride_qh, stride_kblock, stride_kslot, stride_khead,
    stride_vblock, stride_vslot, stride_vhead, stride_tb, stride_ob, stride_oh, block_size,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    gd_mask = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gd_mask,
                other=0.0).to(tl.float32) * scale
    length = tl.load(context_lens_ptr + seq)

    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for start in range(0, length, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_seq = offs_n < length
        block = tl.load(block_tables_ptr + seq * stride_tb + offs_n // block_size, mask=in_seq, other=0)
        block = block.to(tl.int64)
        slot = (offs_n % block_size).to(tl.int64)
        nd_mask = in_seq[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + (block * stride_kblock + slot * stride_kslot + kv_head * stride_khead)[:, None]
                    + offs_d[None, :], mask=nd_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (BLOCK_G, BLOCK_N)
        scores = tl.where(in_seq[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: every tile holds at least one token
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + (block * stride_vblock + slot * stride_vslot + kv_head * stride_vhead)[:, None]
                    + offs_d[None, :], mask=nd_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        denom = denom * alpha + tl.sum(p, axis=1)
        m = m_new
    out = acc / denom[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=gd_mask)


def paged_decode_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                  context_lens: Tensor, scale: float) -> Tensor:
    """Paged decode attention on checked inputs (kernels/paged_attention.py): (B, Hq, D) in q's dtype."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    block_g = triton.next_power_of_2(group)
    block_d = triton.next_power_of_2(head_dim)
    block_n = max(16, TILE_ELEMENTS // (block_g * block_d))
    paged_decode_attention_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, float(scale),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), k_cache.shape[1],
        HEAD_DIM=head_dim, GROUP=group, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
        num_warps=NUM_WARPS,
    )
    return out
