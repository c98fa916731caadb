"""paged_decode_attention: every backend against the torch reference and an independent dense attention."""

import pytest
import torch
import torch.nn.functional as F
from mope.kernels.paged_attention import paged_decode_attention, store_kv

BACKENDS = ["torch", "cpu", "triton"]
# bf16: the output rounded to bf16 (2^-8 relative; measured at most 3.2e-3 against the fp64 dense reference)
TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=4e-3, rtol=4e-3)}


def make_case(
    context_lens,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    block_size=16,
    dtype=torch.float32,
    interleaved=True,
    seed=0,
    q_scale=1.0,
):
    """Random per-sequence K/V scattered into shuffled cache blocks; padding block-table entries are -1.
    With `interleaved`, k and v are strided views of one pool (num_blocks, 2, block_size, Hkv, D)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(context_lens)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if interleaved:
        pool = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
        k_cache, v_cache = pool[:, 0], pool[:, 1]
    else:
        k_cache, v_cache = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    order = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = torch.full((batch, max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    keys, values = [], []
    for b, n in enumerate(context_lens):
        ids = [order.pop() for _ in range(blocks_per_seq[b])]
        block_tables[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        keys.append(torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype))
        values.append(torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype))
        for t in range(n):
            k_cache[ids[t // block_size], t % block_size] = keys[-1][t]
            v_cache[ids[t // block_size], t % block_size] = values[-1][t]
    # q as a strided view of a wider projection output, as the model hands it over
    qkv = torch.randn(batch, num_heads + 2 * num_kv_heads, head_dim, generator=g).to(dtype) * q_scale
    q = qkv[:, :num_heads]
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return (q, k_cache, v_cache, block_tables, lens), keys, values


def dense_attention(q, keys, values, scale):
    """Independent reference: SDPA over each sequence's contiguous K/V, in float64."""
    out = []
    for b in range(q.shape[0]):
        k, v = keys[b].double().transpose(0, 1), values[b].double().transpose(0, 1)
        o = F.scaled_dot_product_attention(q[b, :, None].double(), k, v, scale=scale, enable_gqa=True)
        out.append(o[:, 0])
    return torch.stack(out)


CASES = {
    "gqa-ragged": dict(context_lens=[1, 17, 16, 40, 5]),
    "mqa-odd-block": dict(context_lens=[9, 3, 26], num_heads=4, num_kv_heads=1, block_size=5),
    "mha-contiguous": dict(context_lens=[33, 2], num_heads=2, num_kv_heads=2, interleaved=False),
    "long-peaked-scores": dict(context_lens=[300, 129], head_dim=32, q_scale=8.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backends_match_dense_attention_and_reference(backend, case):
    args, keys, values = make_case(**CASES[case])
    scale = args[0].shape[-1] ** -0.5
    out = paged_decode_attention(*args, scale=scale, backend=backend)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    torch.testing.assert_close(
        out.double(), dense_attention(args[0], keys, values, scale), atol=2e-5, rtol=1e-5
    )
    if backend != "torch":
        reference = paged_decode_attention(*args, scale=scale, backend="torch")
        torch.testing.assert_close(out, reference, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bfloat16(backend):
    args, keys, values = make_case([7, 20, 1], dtype=torch.bfloat16)
    out = paged_decode_attention(*args, scale=0.25, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.double(), dense_attention(args[0], keys, values, 0.25), **TOLERANCES[torch.bfloat16]
    )


def test_auto_is_cpu_on_cpu():
    args, _, _ = make_case([12, 4])
    assert torch.equal(
        paged_decode_attention(*args, scale=0.3), paged_decode_attention(*args, scale=0.3, backend="cpu")
    )


def bad_inputs():
    (q, k, v, tables, lens), _, _ = make_case([5, 20])
    return {
        "q must be a": dict(q=q[0]),
        "q must be float32": dict(q=q.to(torch.int32)),
        "k_cache must be": dict(k_cache=k[..., :8]),
        "multiple of k_cache's 2 kv heads": dict(q=q[:, :3]),
        "v_cache must have": dict(v_cache=v[:, :8]),
        "v_cache must be torch.float32": dict(v_cache=v.double()),
        "k_cache must be contiguous within a block": dict(
            k_cache=k.transpose(1, 2).contiguous().transpose(1, 2)
        ),
        "block_tables must be int32": dict(block_tables=tables.long()),
        r"block_tables must be \(B=2": dict(block_tables=tables[:1]),
        r"context_lens must be \(2,\)": dict(context_lens=lens[:1]),
        "context_lens must be int32": dict(context_lens=lens.long()),
        r"context_lens must be in \[1": dict(context_lens=torch.tensor([0, 20], dtype=torch.int32)),
        "context_lens must be in": dict(context_lens=torch.tensor([5, 64], dtype=torch.int32)),
        "block ids outside": dict(block_tables=torch.where(tables == tables[1, 1], 999, tables)),
        "scale must be a positive": dict(scale=0.0),
        "backend must be one of": dict(backend="cuda"),
    }


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("message", list(bad_inputs()))
def test_bad_inputs_raise_value_error(message, backend):
    (q, k, v, tables, lens), _, _ = make_case([5, 20])
    kwargs = dict(
        q=q, k_cache=k, v_cache=v, block_tables=tables, context_lens=lens, scale=0.25, backend=backend
    )
    kwargs.update(bad_inputs()[message])
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(**kwargs)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape",
    [
        dict(context_lens=[9, 30, 1, 17, 16, 4], num_heads=8, num_kv_heads=4),
        dict(context_lens=[21, 6], num_heads=6, num_kv_heads=3, block_size=8),
    ],
)
def test_cpu_task_splits(threads, shape):
    """The C++ kernel gives a task whole sequences or runs of kv heads (a ragged last run included),
    depending on batch and thread count; every split must agree with dense attention."""
    args, keys, values = make_case(**shape)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = paged_decode_attention(*args, scale=0.3, backend="cpu")
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(
        out.double(), dense_attention(args[0], keys, values, 0.3), atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,num_tokens", [(8, 5), (64, 21)])  # 64: whole cache lines (streaming stores)
def test_store_kv_writes_each_token_at_its_slot(backend, dtype, dim, num_tokens):
    """K/V of new tokens (v a strided view of a projection output, as the model hands it over) land in
    the interleaved pool at their slots, nothing else changes; 21 tokens split over threads."""
    g = torch.Generator().manual_seed(3)
    num_blocks, block_size, heads = 8, 4, 2
    pool = torch.randn(num_blocks, 2, block_size, heads, dim, generator=g).to(dtype)
    expected = pool.clone()
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    k = torch.randn(len(slots), heads, dim, generator=g).to(dtype)
    v = torch.randn(len(slots), 3 * heads, dim, generator=g).to(dtype)[:, heads : 2 * heads]
    for n, slot in enumerate(slots.tolist()):
        expected[slot // block_size, 0, slot % block_size] = k[n]
        expected[slot // block_size, 1, slot % block_size] = v[n]
    store_kv(k, v, pool[:, 0], pool[:, 1], slots, backend=backend)
    assert torch.equal(pool, expected)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("slot", [-1, 20])
def test_store_kv_rejects_slots_outside_the_cache(backend, slot):
    pool = torch.zeros(5, 2, 4, 2, 8)
    k = torch.ones(2, 2, 8)
    with pytest.raises(ValueError, match="outside the cache"):
        store_kv(k, k, pool[:, 0], pool[:, 1], torch.tensor([0, slot]), backend=backend)
    assert not pool.any()
