"""Triton paged decode attention: one new query token per sequence against its paged K/V cache.

One program per (sequence, kv head) serves the kv head's whole group of query heads, so each cached
K/V row is read once per group (GQA), with an online softmax in fp32 over tiles of BLOCK_N tokens.
A tile gathers its tokens through the block table token by token (block id of t // block_size, slot
t % block_size), so any block size and any block stride work. Both products are tl.dot tiles with the
group padded to 16 rows (tensor-core tiles need 16; the padding costs FLOPs, which a decode step has to
spare: it is bound by reading the cache), on operands upcast to fp32: "ieee" for fp32 caches, "tf32"
for bf16/fp16 ones (tf32 holds their values exactly; the softmax weights round to tf32, rel. 2^-11).
A broadcast-and-sum tile instead needed 164-218 registers per thread (ptxas report, kernels/aot.py).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 16  # cached tokens per tile
NUM_WARPS = 8  # with BLOCK_N = 16: 115 registers on sm_80 and sm_90, no spills (kernels/aot.py)


@triton.jit
def paged_decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr, out_ptr, scale,
    stride_qb, stride_qh, stride_kblock, stride_kslot, stride_khead,
    stride_vblock, stride_vslot, stride_vhead, stride_tb, stride_len, stride_ob, stride_oh, block_size,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    gd_mask = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gd_mask,
                other=0.0).to(tl.float32)
    length = tl.load(context_lens_ptr + seq * stride_len)

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
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_G, BLOCK_N)
        scores = tl.where(in_seq[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: every tile holds at least one token
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + (block * stride_vblock + slot * stride_vslot + kv_head * stride_vhead)[:, None]
                    + offs_d[None, :], mask=nd_mask, other=0.0).to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
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
    paged_decode_attention_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, float(scale),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        context_lens.stride(0), out.stride(0), out.stride(1), k_cache.shape[1],
        HEAD_DIM=head_dim, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=NUM_WARPS,
    )
    return out
