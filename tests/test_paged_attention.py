"""paged_decode_attention: every backend against the torch reference and an independent dense attention."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mope.kernels.paged_attention import paged_decode_attention, store_kv

from tests.helpers import on_threads

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
    out = on_threads(threads, paged_decode_attention, *args, scale=0.3, backend="cpu")
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


def strided(lens):
    """lens as a view with stride 2 (every other entry of a wider tensor)."""
    return torch.stack([lens, torch.full_like(lens, 10**6)], dim=1)[:, 0]


REGRESSIONS = {
    # the C++ kernel read context_lens[b] as if contiguous: other sequences' lengths, silently
    "strided-context-lens": lambda q, k, v, tables, lens: (q, k, v, tables, strided(lens)),
    # k in an interleaved pool, v on its own (the contract allows any block stride): a RuntimeError
    "k-and-v-block-strides-differ": lambda q, k, v, tables, lens: (q, k, v.contiguous(), tables, lens),
    # no sequences: the task split divided by B = 0 (SIGFPE: the process died)
    "empty-batch": lambda q, k, v, tables, lens: (q[:0], k, v, tables[:0], lens[:0]),
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_cpu_regressions(case):
    """Minimal cases the fuzzing below found (each failed before its fix), against the torch reference."""
    args, _, _ = make_case([5, 20, 9])
    args = REGRESSIONS[case](*args)
    out = paged_decode_attention(*args, scale=0.3, backend="cpu")
    torch.testing.assert_close(out, paged_decode_attention(*args, scale=0.3, backend="torch"),
                               **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_store_kv_rejects_a_v_cache_of_another_geometry(backend):
    """Slots are checked against k_cache: a v_cache with fewer blocks took v's rows past its end (C++)."""
    pool = torch.zeros(8, 4, 2, 8)
    k = torch.ones(1, 2, 8)
    with pytest.raises(ValueError, match="v_cache must have k_cache's"):
        store_kv(k, k, pool.clone(), pool[:2], torch.tensor([30]), backend=backend)
    assert not pool.any()


# ---- Property-based fuzzing (hypothesis) of the C++ kernels against float64 references ----
@st.composite
def fuzz_paged_case(draw):
    """Context lengths at and around block boundaries (1-token contexts included), GQA/MQA/MHA, head dims
    the kernel accepts, fp32/bf16/fp16, block tables with distinct, shared (within and across sequences)
    or a single block, padding entries -1 / out of range / 0, k and v interleaved, separate, or with
    different block strides, block tables and context_lens as strided views, 1 and 2 threads."""
    block_size = draw(st.sampled_from([1, 2, 3, 5, 8, 16, 32]))
    boundary = st.sampled_from([1, max(1, block_size - 1), block_size, block_size + 1, 3 * block_size + 1])
    return dict(
        block_size=block_size,
        lens=draw(st.lists(boundary | st.integers(1, 70), min_size=1, max_size=5)),
        num_kv_heads=draw(st.integers(1, 4)), group=draw(st.sampled_from([1, 2, 3, 8])),
        head_dim=draw(st.sampled_from([1, 3, 8, 16, 17, 64, 80, 128, 256])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        layout=draw(st.sampled_from(["interleaved", "separate", "k-interleaved-v-separate"])),
        blocks=draw(st.sampled_from(["distinct", "shared", "one"])),
        padding=draw(st.sampled_from([-1, 10**6, 0])),
        strided_metadata=draw(st.booleans()), q_scale=draw(st.sampled_from([0.1, 1.0, 4.0])),
        threads=draw(st.sampled_from([1, 2])), seed=draw(st.integers(0, 2**16)),
    )


FUZZ_TOLERANCES = dict(TOLERANCES) | {torch.float16: dict(atol=1e-3, rtol=1e-3)}


def fuzz_inputs(c: dict) -> tuple[tuple, float, torch.Tensor]:
    """The arguments (q, k_cache, v_cache, block_tables, context_lens) and scale of a drawn case, and the
    float64 attention over each sequence's own K/V."""
    g = torch.Generator().manual_seed(c["seed"])
    block_size, lens, dtype = c["block_size"], c["lens"], c["dtype"]
    needed = [-(-n // block_size) for n in lens]
    if c["blocks"] == "distinct":
        num_blocks = sum(needed) + 1
        order = torch.randperm(num_blocks, generator=g).tolist()
        ids = [[order.pop() for _ in range(n)] for n in needed]
    else:  # drawn with replacement: blocks shared across and within sequences (or all the same one)
        num_blocks = max(2, sum(needed) // 2) if c["blocks"] == "shared" else 1
        ids = [torch.randint(0, num_blocks, (n,), generator=g).tolist() for n in needed]
    shape = (num_blocks, block_size, c["num_kv_heads"], c["head_dim"])
    if c["layout"] == "interleaved":
        k_cache, v_cache = torch.randn(num_blocks, 2, *shape[1:], generator=g).to(dtype).unbind(1)
    else:
        k_cache, v_cache = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
        if c["layout"] == "k-interleaved-v-separate":
            k_cache = torch.randn(num_blocks, 3, *shape[1:], generator=g).to(dtype)[:, 1]
    tables = torch.full((len(lens), max(needed) + 1), c["padding"], dtype=torch.int32)
    for b, row in enumerate(ids):
        tables[b, : len(row)] = torch.tensor(row, dtype=torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    if c["strided_metadata"]:
        tables, context_lens = tables.repeat(1, 2)[:, : tables.shape[1]], strided(context_lens)
    num_heads = c["num_kv_heads"] * c["group"]
    q = (torch.randn(len(lens), num_heads + 2, c["head_dim"], generator=g) * c["q_scale"])[:, 1:-1].to(dtype)
    scale = c["head_dim"] ** -0.5
    expected = torch.empty(q.shape, dtype=torch.float64)
    for b, n in enumerate(lens):
        blocks = torch.tensor(ids[b])
        k, v = (cache[blocks].double().flatten(0, 1)[:n].repeat_interleave(c["group"], dim=1)
                for cache in (k_cache, v_cache))
        weights = (torch.einsum("hd,lhd->hl", q[b].double(), k) * scale).softmax(dim=-1)
        expected[b] = torch.einsum("hl,lhd->hd", weights, v)
    return (q, k_cache, v_cache, tables, context_lens), scale, expected


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(c=fuzz_paged_case())
def test_fuzz_cpu_matches_float64_reference(c):
    args, scale, expected = fuzz_inputs(c)
    out = on_threads(c["threads"], paged_decode_attention, *args, scale=scale, backend="cpu")
    assert out.dtype == c["dtype"]
    torch.testing.assert_close(out.double(), expected, **FUZZ_TOLERANCES[c["dtype"]])


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(num_tokens=st.integers(0, 40), heads=st.integers(1, 4), dim=st.sampled_from([1, 3, 8, 16, 64, 128]),
       block_size=st.sampled_from([1, 3, 16]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       interleaved=st.booleans(), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_fuzz_store_kv_writes_each_token_at_its_slot(num_tokens, heads, dim, block_size, dtype, interleaved,
                                                     threads, seed):
    """Row sizes of whole 64-byte lines (streaming stores) and not, strided k/v, 0..40 tokens over threads."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = -(-num_tokens // block_size) + 2
    pool = torch.randn(num_blocks, 2, block_size, heads, dim, generator=g).to(dtype)
    if not interleaved:
        pool = pool.transpose(0, 1).contiguous().transpose(0, 1)  # k_cache, v_cache each contiguous
    expected = pool.clone()
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    kv = torch.randn(num_tokens, 3 * heads, dim, generator=g).to(dtype)
    k, v = kv[:, :heads], kv[:, 2 * heads :]
    for n, slot in enumerate(slots.tolist()):
        expected[slot // block_size, :, slot % block_size] = torch.stack([k[n], v[n]])
    on_threads(threads, store_kv, k, v, pool[:, 0], pool[:, 1], slots, backend="cpu")
    assert torch.equal(pool, expected)
