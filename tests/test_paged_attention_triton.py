"""The Triton paged decode kernel in 16-bit dtypes and odd shapes (the shared backend tests cover fp32):
against a dense float64 attention over each sequence's own K/V, in the interpreter."""

import pytest
import torch
from mope.kernels.paged_attention import paged_decode_attention


def dense_attention(q, keys, values, scale):
    """(B, Hq, D) float64: softmax(q kᵀ scale) v per sequence, query head h on kv head h // group."""
    group = q.shape[1] // keys[0].shape[1]
    out = []
    for b in range(q.shape[0]):
        k = keys[b].double().repeat_interleave(group, dim=1)  # (L, Hq, D)
        v = values[b].double().repeat_interleave(group, dim=1)
        weights = (torch.einsum("hd,lhd->hl", q[b].double(), k) * scale).softmax(dim=-1)
        out.append(torch.einsum("hl,lhd->hd", weights, v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim,block_size", [
    (torch.bfloat16, 8, 2, 64, 16),  # GQA group 4
    (torch.float16, 6, 1, 40, 7),  # MQA, head_dim and block size not powers of two
])
def test_16_bit_caches_match_dense_attention(dtype, num_heads, num_kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(0)
    context_lens = [1, 23, 40]
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    # k and v interleaved in one pool: the block dim of each has stride 2 * block_size * Hkv * D
    pool = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    k_cache, v_cache = pool[:, 0], pool[:, 1]
    free = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = torch.full((len(context_lens), 8), -1, dtype=torch.int32)
    keys, values = [], []
    for b, length in enumerate(context_lens):
        ids = [free.pop() for _ in range(-(-length // block_size))]
        block_tables[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        slots = torch.tensor([ids[t // block_size] for t in range(length)]), torch.arange(length) % block_size
        keys.append(k_cache[slots])
        values.append(v_cache[slots])
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=g).to(dtype)
    scale = head_dim**-0.5
    lens = torch.tensor(context_lens, dtype=torch.int32)
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, lens, scale=scale, backend="triton")
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), dense_attention(q, keys, values, scale), atol=1e-2, rtol=1e-2)
