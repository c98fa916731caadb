"""The Triton paged decode kernel in 16-bit dtypes and odd shapes (the shared backend tests cover fp32):
against a dense float64 attention over each sequence's own K/V, in the interpreter."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from mope.kernels.paged_attention import paged_decode_attention

from tests.test_paged_attention import FUZZ_TOLERANCES, fuzz_inputs, fuzz_paged_case


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


# The interpreter (Triton 3.9) rounds fp32 -> bf16 toward zero, a GPU to nearest: up to 1 ulp = 2^-7 relative.
TRITON_TOLERANCES = FUZZ_TOLERANCES | {torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(c=fuzz_paged_case())
def test_fuzz_triton_matches_float64_reference(c):
    """The C++ kernel's fuzzed cases (tests/test_paged_attention.py): lengths at block boundaries and 1,
    GQA/MQA/MHA, odd head dims, shared and padded blocks, strided caches and metadata."""
    args, scale, expected = fuzz_inputs(c)
    out = paged_decode_attention(*args, scale=scale, backend="triton")
    assert out.dtype == c["dtype"]
    torch.testing.assert_close(out.double(), expected, **TRITON_TOLERANCES[c["dtype"]])


def test_strided_context_lens():
    """Found by the fuzzing: the kernel read context_lens[b] at offset b, ignoring its stride, so a (B,) view
    with stride 2 gave sequence 1 the neighbouring entry (8) as its length: wrong blocks read."""
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 2, 4, 1, 16, generator=g).unbind(0)
    q = torch.randn(2, 1, 16, generator=g)
    block_tables = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    context_lens = torch.tensor([[3, 8], [5, 8]], dtype=torch.int32)[:, 0]
    args = (q, k_cache, v_cache, block_tables, context_lens)
    out = paged_decode_attention(*args, scale=0.25, backend="triton")
    torch.testing.assert_close(out, paged_decode_attention(*args, scale=0.25, backend="torch"))
