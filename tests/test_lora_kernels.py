"""Batched LoRA over rows of many adapters against a dense per-row float64 computation and the torch
reference: add_lora's backends (the Triton kernels run in the interpreter) and the CPU fold of the engine's
decode steps (packed_linear.packed_lora_linear)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mope.kernels import packed_linear
from mope.kernels.lora import LoRARows, add_lora

from tests.helpers import (
    PACKED_LINEAR_ISAS,
    PACKED_LINEAR_RUNS,
    assert_within_fp32_rounding,
    on_threads,
)

BACKENDS = ["torch", "triton"]
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make_case(num_rows=37, hidden=80, rank=8, out_features=70, num_adapters=3, dtype=torch.float32, seed=0,
              sort_rows=False):
    """Adapter ids with -1 rows, unsorted unless `sort_rows` (each adapter's rows then consecutive);
    adapter 1 has no rows; sizes not multiples of the kernel tiles."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, hidden, generator=g).to(dtype)
    lora_a = (torch.randn(num_adapters, rank, hidden, generator=g) / hidden**0.5).to(dtype)
    lora_b = torch.randn(num_adapters, out_features, rank, generator=g).to(dtype)
    choices = torch.tensor([-1] + [a for a in range(num_adapters) if a != 1])
    index = choices[torch.randint(0, len(choices), (num_rows,), generator=g)]
    if sort_rows:
        index = index.sort().values
    base = torch.randn(num_rows, out_features, generator=g).to(dtype)
    scaling = torch.rand(num_adapters, generator=g) + 0.5
    return x, lora_a, lora_b, index, base, scaling


def dense_per_row(x, lora_a, lora_b, index, base, scaling):
    """Independent reference: row by row, in float64."""
    out = base.double().clone()
    for n, adapter in enumerate(index.tolist()):
        if adapter >= 0:
            a, b = lora_a[adapter].double(), lora_b[adapter].double()
            out[n] += float(scaling[adapter]) * (b @ (a @ x[n].double()))
    return out


@pytest.mark.parametrize("sort_rows", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_dense_per_row(backend, dtype, sort_rows):
    x, lora_a, lora_b, index, base, scaling = make_case(dtype=dtype, sort_rows=sort_rows)
    out = base.clone()
    returned = add_lora(out, x, lora_a, lora_b, index, scaling=scaling, backend=backend)
    assert returned is out and out.dtype == dtype
    torch.testing.assert_close(out.double(), dense_per_row(x, lora_a, lora_b, index, base, scaling),
                               **TOLERANCES[dtype])
    untouched = index == -1
    assert torch.equal(out[untouched], base[untouched])
    if backend != "torch":
        reference = add_lora(base.clone(), x, lora_a, lora_b, index, scaling=scaling, backend="torch")
        torch.testing.assert_close(out, reference, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_reused_across_projections_and_scaling_none(backend):
    # Two projections of one step (different H and OUT) share one LoRARows; scaling None means 1.
    x, lora_a, lora_b, index, base, _ = make_case(num_rows=20, num_adapters=4, rank=16, seed=1)
    rows = LoRARows.from_index(index, 4)
    ones = torch.ones(4)
    out = add_lora(base.clone(), x, lora_a, lora_b, rows, backend=backend)
    torch.testing.assert_close(out.double(), dense_per_row(x, lora_a, lora_b, index, base, ones),
                               **TOLERANCES[torch.float32])
    x2 = torch.randn(20, 33)
    a2, b2 = torch.randn(4, 16, 33) / 6, torch.randn(4, 129, 16)
    base2 = torch.zeros(20, 129)
    out2 = add_lora(base2.clone(), x2, a2, b2, rows, backend=backend)
    torch.testing.assert_close(out2.double(), dense_per_row(x2, a2, b2, index, base2, ones),
                               **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows_and_all_base_rows(backend):
    x, lora_a, lora_b, _, base, scaling = make_case(num_rows=5)
    out = add_lora(base.clone(), x, lora_a, lora_b, torch.full((5,), -1), scaling=scaling, backend=backend)
    assert torch.equal(out, base)
    no_index = torch.zeros(0, dtype=torch.int64)
    empty = add_lora(base[:0].clone(), x[:0], lora_a, lora_b, no_index, backend=backend)
    assert empty.shape == (0, base.shape[1])


def packed_lora(x, weight, bias, lora_a, lora_b, index, scaling):
    """x @ weightᵀ + bias + each row's delta through packed_lora_linear, as engine/lora.py builds it."""
    num_adapters, rank, hidden = lora_a.shape
    folded = packed_linear.pack_weight(torch.cat([weight, lora_a.reshape(num_adapters * rank, hidden)]))
    expand = (lora_b * scaling[:, None, None]).permute(1, 0, 2).reshape(weight.shape[0], -1)
    return packed_linear.packed_lora_linear(x, folded, bias, index,
                                            packed_linear.pack_lora_expand(expand, num_adapters))


needs_packed = pytest.mark.skipif(not PACKED_LINEAR_RUNS, reason="needs AVX-512 or AVX2 and a C++ compiler")
every_isa = pytest.mark.parametrize("isa", PACKED_LINEAR_ISAS or ["none"])  # every form this CPU runs


@needs_packed
@every_isa
@pytest.mark.parametrize("num_rows", [1, 6, 7, 12, 37, 256])
@pytest.mark.parametrize("sort_rows", [False, True])
def test_packed_lora_linear_matches_dense_per_row(isa, num_rows, sort_rows):
    """Rows unsorted (runs of one row) and sorted (runs longer than the 6- and 12-row micro-kernels), -1
    rows, an adapter without rows, output and hidden sizes off the 32-output panels; then the
    block-diagonal expand of a fused projection (two shards), whose zero blocks the kernel skips."""
    x, lora_a, lora_b, index, _, scaling = make_case(num_rows=num_rows, sort_rows=sort_rows, seed=num_rows)
    with packed_linear.using_instruction_set(isa):
        weight, bias = torch.randn(70, 80) / 9, torch.randn(70)
        base = torch.nn.functional.linear(x, weight, bias)
        out = packed_lora(x, weight, bias, lora_a, lora_b, index, scaling)
        expected = dense_per_row(x, lora_a, lora_b, index, base, scaling)
        torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])
        fused_b = torch.zeros_like(lora_b)
        fused_b[:, :40, :4], fused_b[:, 40:, 4:] = lora_b[:, :40, :4], lora_b[:, 40:, 4:]
        out = packed_lora(x, weight, bias, lora_a, fused_b, index, scaling)
        torch.testing.assert_close(out.double(), dense_per_row(x, lora_a, fused_b, index, base, scaling),
                                   **TOLERANCES[torch.float32])


@needs_packed
def test_pack_lora_expand_skips_zero_columns_per_panel():
    """k_ranges: per 32-output panel and adapter, the span of that adapter's columns nonzero there; the
    packed factors hold just those spans, each as rows of the panel's 32 outputs (zeros past OUT)."""
    b = torch.zeros(70, 2 * 6)  # two adapters, width 6
    b[:32, 0:2] = torch.randn(32, 2)  # panel 0, adapter 0: columns 0-1
    b[40:45, 3] = torch.randn(5)  # panel 1, adapter 0: column 3
    b[64:, 6 + 5] = torch.randn(6)  # panel 2, adapter 1: column 5
    expand = packed_linear.pack_lora_expand(b, 2)
    assert expand.k_ranges.tolist() == [[[0, 2], [0, 0]], [[3, 4], [0, 0]], [[0, 0], [5, 6]]]
    assert expand.width == 6
    padded = torch.cat([b, torch.zeros(96 - 70, 12)])
    expected = torch.stack([padded[:32, 0], padded[:32, 1], padded[32:64, 3], padded[64:96, 11]])
    assert torch.equal(expand.panels, expected)


@needs_packed
def test_packed_lora_linear_refuses_bad_inputs():
    x, lora_a, lora_b, index, _, scaling = make_case(num_rows=6)
    weight, bias = torch.randn(70, 80), torch.randn(70)
    with pytest.raises(ValueError, match="adapter out of range"):
        packed_lora(x, weight, bias, lora_a, lora_b, torch.full((6,), 3), scaling)
    with pytest.raises(ValueError, match="adapter_index"):
        packed_lora(x, weight, bias, lora_a, lora_b, index[:-1], scaling)
    with pytest.raises(ValueError, match="bias"):
        packed_lora(x, weight, bias[:-1], lora_a, lora_b, index, scaling)
    with pytest.raises(ValueError, match="rows"):
        packed_lora(torch.randn(257, 80), weight, bias, lora_a, lora_b, torch.zeros(257, dtype=torch.int64),
                    scaling)
    folded = packed_linear.pack_weight(torch.cat([weight, lora_a.reshape(-1, weight.shape[1])]))
    expand = packed_linear.pack_lora_expand(lora_b.permute(1, 0, 2).reshape(70, -1), len(lora_a))
    short = expand._replace(panels=expand.panels[1:])
    with pytest.raises(ValueError, match="expand must come from pack_expand"):
        packed_linear.packed_lora_linear(x, folded, None, index, short)
    with pytest.raises(ValueError, match="expand must come from pack_lora_expand"):
        packed_linear.packed_lora_linear(x, folded, None, index, tuple(expand))
    with pytest.raises(ValueError, match="folded must come from pack_weight"):
        packed_linear.packed_lora_linear(x, folded.panels, None, index, expand)
    other = packed_linear.pack_lora_expand(lora_b.permute(1, 0, 2).reshape(70, -1)[:64], len(lora_a))
    with pytest.raises(ValueError, match="folded has 70 \\+ 3 · 8 rows"):  # W's 64 outputs expected
        packed_linear.packed_lora_linear(x, folded, None, index, other)
    with pytest.raises(ValueError, match="L = 0"):
        packed_linear.pack_lora_expand(lora_b[0], 0)


def bad_inputs():
    x, lora_a, lora_b, index, base, scaling = make_case(num_rows=6)
    ok = dict(out=base, x=x, lora_a=lora_a, lora_b=lora_b, rows=index, scaling=scaling)
    yield "x", dict(ok, x=x[0])
    yield "lora_a", dict(ok, lora_a=lora_a[:, :, :-1])
    yield "lora_b", dict(ok, lora_b=lora_b[:, :, :-1])
    yield "out", dict(ok, out=base[:, :-1])
    yield "lora_b", dict(ok, lora_b=lora_b.double())
    yield "x", dict(ok, x=x.T.contiguous().T)
    yield "adapter_index", dict(ok, rows=index.float())
    yield "adapter_index", dict(ok, rows=torch.full((6,), 3))
    yield "adapter_index", dict(ok, rows=torch.full((6,), -2))
    yield "rows", dict(ok, rows=index[:-1])
    yield "scaling", dict(ok, scaling=scaling[:-1])


@pytest.mark.parametrize("name,kwargs", list(bad_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_raise_value_error(name, kwargs):
    kwargs = dict(kwargs)
    args = [kwargs.pop(k) for k in ("out", "x", "lora_a", "lora_b", "rows")]
    with pytest.raises(ValueError, match=name):
        add_lora(*args, **kwargs)


def test_unknown_backend_raises_value_error():
    x, lora_a, lora_b, index, base, _ = make_case(num_rows=3)
    with pytest.raises(ValueError, match="backend"):
        add_lora(base, x, lora_a, lora_b, index, backend="gpu")


def test_triton_backend_off_cuda_needs_the_interpreter(monkeypatch):
    x, lora_a, lora_b, index, base, _ = make_case(num_rows=3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton"):
        add_lora(base, x, lora_a, lora_b, index, backend="triton")


@needs_packed
@pytest.mark.parametrize("num_rows,hidden", [
    pytest.param(13, 0, id="k0-past-12-rows"),  # no 128-k slice ran: y was left unwritten (not the bias)
])
@every_isa
def test_packed_lora_linear_regressions(isa, num_rows, hidden):
    """Minimal cases the fuzzing below found (each failed before its fix)."""
    x, lora_a, lora_b, index, _, scaling = make_case(num_rows=num_rows, hidden=hidden, out_features=5)
    weight, bias = torch.randn(5, hidden), torch.randn(5)
    with packed_linear.using_instruction_set(isa):
        out = packed_lora(x, weight, bias, lora_a, lora_b, index, scaling)
    expected = dense_per_row(x, lora_a, lora_b, index, torch.nn.functional.linear(x, weight, bias), scaling)
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])


@needs_packed
def test_packed_lora_linear_refuses_a_float_adapter_index():
    """A float index was cast to int64 (0.9 -> adapter 0): now a ValueError, as add_lora's."""
    x, lora_a, lora_b, index, _, scaling = make_case(num_rows=6)
    weight = torch.randn(70, 80)
    with pytest.raises(ValueError, match="adapter_index must have an integer dtype"):
        packed_lora(x, weight, None, lora_a, lora_b, index.float() + 0.9, scaling)


# ---- Property-based fuzzing (hypothesis) of packed_lora_linear against a float64 per-row reference ----
# 1-4 adapters of different ranks (zero-padded to the widest), a fused projection of 1-3 shards of which each
# adapter targets some (block-diagonal expand; possibly none), rows of -1 mixed in, sorted runs, all rows
# one adapter or none, row counts up to MAX_ROWS, K empty/odd/around the 128-k slices, 1 and 2 threads.
@st.composite
def fuzz_lora_layer(draw):
    num_adapters, rank = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    shard_sizes = draw(st.lists(st.sampled_from([1, 5, 31, 32, 33, 40]), min_size=1, max_size=3))
    ranks = [[draw(st.sampled_from([0, rank]) | st.integers(1, rank)) for _ in shard_sizes]
             for _ in range(num_adapters)]  # 0: the adapter does not target that shard
    return num_adapters, rank, shard_sizes, ranks


def stacked_adapters(layer, hidden: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_a (L, width, H), lora_b (L, OUT, width) of a drawn layer, as engine/lora.py stacks them: shard s
    at columns s * rank, zero past each adapter's rank (block-diagonal B)."""
    num_adapters, rank, shard_sizes, ranks = layer
    out_features, width = sum(shard_sizes), len(shard_sizes) * rank
    lora_a, lora_b = torch.zeros(num_adapters, width, hidden), torch.zeros(num_adapters, out_features, width)
    starts = [sum(shard_sizes[:s]) for s in range(len(shard_sizes))]
    for l, shard_ranks in enumerate(ranks):
        for s, r in enumerate(shard_ranks):
            columns, outputs = slice(s * rank, s * rank + r), slice(starts[s], starts[s] + shard_sizes[s])
            lora_a[l, columns] = torch.randn(r, hidden, generator=g)
            lora_b[l, outputs, columns] = torch.randn(shard_sizes[s], r, generator=g)
    return lora_a, lora_b


def adapter_index(rows: str, num_rows: int, num_adapters: int, g: torch.Generator) -> torch.Tensor:
    if rows in ("random", "sorted"):
        index = torch.randint(-1, num_adapters, (num_rows,), generator=g)
        return index.sort().values if rows == "sorted" else index
    return torch.full((num_rows,), num_adapters - 1 if rows == "one adapter" else -1)


@needs_packed
@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(layer=fuzz_lora_layer(),
       num_rows=st.sampled_from([1, 12, 13, 25, 256]) | st.integers(1, packed_linear.MAX_ROWS),
       hidden=st.sampled_from([0, 1, 127, 128, 129]) | st.integers(1, 300),
       rows=st.sampled_from(["random", "sorted", "one adapter", "no adapter"]), bias=st.booleans(),
       transposed=st.booleans(), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16),
       isa=st.sampled_from(PACKED_LINEAR_ISAS or ["none"]))
def test_fuzz_packed_lora_linear_matches_float64_reference(layer, num_rows, hidden, rows, bias, transposed,
                                                          threads, seed, isa):
    num_adapters, rank, shard_sizes, ranks = layer
    g = torch.Generator().manual_seed(seed)
    out_features, width = sum(shard_sizes), len(shard_sizes) * rank
    x = torch.randn(hidden, num_rows, generator=g).T if transposed else torch.randn(num_rows, hidden,
                                                                                        generator=g)
    weight = torch.randn(out_features, hidden, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    lora_a, lora_b = stacked_adapters(layer, hidden, g)
    index = adapter_index(rows, num_rows, num_adapters, g)
    folded = packed_linear.pack_weight(torch.cat([weight, lora_a.reshape(num_adapters * width, hidden)]))
    expand = packed_linear.pack_lora_expand(lora_b.permute(1, 0, 2).reshape(out_features, -1), num_adapters)
    with packed_linear.using_instruction_set(isa):
        out = on_threads(threads, packed_linear.packed_lora_linear, x, folded, b, index, expand)
    x64, b64 = x.double(), (b.double() if bias else torch.zeros(out_features, dtype=torch.float64))
    expected, magnitude = x64 @ weight.double().T + b64, x64.abs() @ weight.double().abs().T + b64.abs()
    for n, l in enumerate(index.tolist()):
        if l >= 0:
            expected[n] += lora_b[l].double() @ (lora_a[l].double() @ x64[n])
            magnitude[n] += lora_b[l].double().abs() @ (lora_a[l].double().abs() @ x64[n].abs())
    assert_within_fp32_rounding(out, expected, magnitude)


# ---- The same layers through add_lora's Triton kernels (interpreter) ----
# Unsorted and sorted rows with -1 rows, adapters without rows (all rows on the last one), ranks differing
# per adapter and shard, row counts around the 16-row tiles, hidden sizes around the 32-wide shrink steps,
# outputs around the 64-column expand tiles, fp32/bf16/fp16, x, out and the adapter stacks as strided views.
FUZZ_TOLERANCES = TOLERANCES | {torch.float16: dict(atol=1e-2, rtol=1e-2)}


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(layer=fuzz_lora_layer(), num_rows=st.sampled_from([1, 15, 16, 17, 33]) | st.integers(1, 50),
       hidden=st.sampled_from([1, 31, 32, 33, 80]),
       rows=st.sampled_from(["random", "sorted", "one adapter", "no adapter"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), views=st.booleans(),
       scaled=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_triton_matches_dense_per_row(layer, num_rows, hidden, rows, dtype, views, scaled, seed):
    g = torch.Generator().manual_seed(seed)
    lora_a, lora_b = (t.to(dtype) for t in stacked_adapters(layer, hidden, g))
    num_adapters, out_features = lora_b.shape[:2]
    index = adapter_index(rows, num_rows, num_adapters, g)
    x, base = (torch.randn(num_rows, n, generator=g).to(dtype) for n in (hidden, out_features))
    scaling = torch.rand(num_adapters, generator=g) + 0.5 if scaled else None
    out = base.clone()
    if views:  # slices of tensors twice as wide: rows of x and out, adapters and B's rows strided
        x, out = (torch.cat([t, t], dim=1)[:, : t.shape[1]] for t in (x, base))
        lora_a = torch.cat([lora_a, lora_a], dim=1)[:, : lora_a.shape[1]]
        lora_b = torch.cat([lora_b, lora_b], dim=2)[:, :, : lora_b.shape[2]]
    add_lora(out, x, lora_a, lora_b, index, scaling=scaling, backend="triton")
    ones = torch.ones(num_adapters)
    expected = dense_per_row(x, lora_a, lora_b, index, base, ones if scaling is None else scaling)
    torch.testing.assert_close(out.double(), expected, **FUZZ_TOLERANCES[dtype])
    assert torch.equal(out[index == -1], base[index == -1])
