"""decoder_ops (RMSNorm with residual, rotary, SiLU-gated product): each backend against an independent
reference (transformers' Llama modules and plain formulas), shapes as the model hands them over."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mope.kernels.decoder_ops import rms_norm, rotary, silu_mul
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from tests.helpers import on_threads

BACKENDS = ["torch", "cpu"]
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def projection_output(rows, width, seed=0, scale=1.0):
    """A (rows, width) strided view into a wider GEMM output, as a fused projection's shard is."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, width + 7, generator=g) * scale)[:, 3 : 3 + width]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 5, 70])  # 70: more rows than one parallel task
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_transformers(backend, rows, with_residual):
    hidden = 48
    x, residual = projection_output(rows, hidden, seed=1), projection_output(rows, hidden, seed=2)
    reference = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.rand(hidden) + 0.5)
        if with_residual:
            out, total = rms_norm(x, reference.weight, 1e-5, residual, backend=backend)
            torch.testing.assert_close(total, x + residual, atol=0, rtol=0)
            torch.testing.assert_close(out, reference(x + residual), **TOLERANCE)
        else:
            torch.testing.assert_close(rms_norm(x, reference.weight, 1e-5, backend=backend), reference(x),
                                       **TOLERANCE)
    assert x.equal(projection_output(rows, hidden, seed=1)), "the input was modified"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_over_heads(backend):
    """Qwen3's q/k norm: (N, H, D) views of the qkv output, normalised over D."""
    q = projection_output(3, 4 * 16).unflatten(-1, (4, 16))
    weight = torch.rand(16) + 0.5
    expected = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(rms_norm(q, weight, 1e-6, backend=backend), expected, **TOLERANCE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 6, 40])
def test_rotary_matches_transformers(backend, rows):
    heads, kv_heads, dim = 4, 2, 16
    qkv = projection_output(rows, (heads + 2 * kv_heads) * dim, seed=3)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.unflatten(-1, (heads, dim)), k.unflatten(-1, (kv_heads, dim))
    angles = torch.arange(rows, dtype=torch.float32)[:, None] * 10000 ** (-torch.arange(0, dim, 2) / dim)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    q_out, k_out = rotary(q, k, cos, sin, backend=backend)
    # transformers: (batch, heads, seq, dim) with cos/sin over the full head dim
    full_cos, full_sin = torch.cat([cos, cos], -1).transpose(0, 1), torch.cat([sin, sin], -1).transpose(0, 1)
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], full_cos, full_sin)
    torch.testing.assert_close(q_out, q_ref[0].transpose(0, 1), **TOLERANCE)
    torch.testing.assert_close(k_out, k_ref[0].transpose(0, 1), **TOLERANCE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 7, 65])
def test_silu_mul_matches_formula(backend, rows):
    gate_up = projection_output(rows, 2 * 40, seed=4, scale=30.0)  # large |gate|: both sigmoid branches
    gate_up[0, 0], gate_up[0, 1] = 200.0, -200.0  # beyond exp's range
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gate_up, backend=backend).double(), F.silu(gate) * up, **TOLERANCE)


def test_silu_mul_propagates_nan():
    gate_up = torch.ones(2, 8)
    gate_up[1, 2] = float("nan")
    out = silu_mul(gate_up, backend="cpu")
    assert out[1, 2].isnan() and not out[0].isnan().any()


def test_auto_keeps_autograd():
    """With gradients needed, "auto" takes the differentiable torch path: gradients as the formula's."""
    x = torch.randn(3, 8, requires_grad=True)
    weight = torch.rand(8, requires_grad=True)
    residual = torch.randn(3, 8)
    out, total = rms_norm(x, weight, 1e-6, residual)
    (out.sum() + silu_mul(total).sum()).backward()
    x_ref, weight_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    total_ref = x_ref + residual  # the formulas written out
    out_ref = total_ref * torch.rsqrt(total_ref.pow(2).mean(-1, keepdim=True) + 1e-6) * weight_ref
    gate, up = total_ref.chunk(2, dim=-1)
    (out_ref.sum() + (gate * torch.sigmoid(gate) * up).sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(weight.grad, weight_ref.grad)


def test_auto_takes_torch_for_layouts_the_cpp_does_not_read():
    """A transposed x (last dim strided) and cos/sin broadcast over the tokens: "auto" gives the formula's
    result through torch, where "cpu" refuses them naming the layout."""
    x = torch.randn(8, 5).t()  # (5, 8), strides (1, 5)
    weight = torch.rand(8) + 0.5
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), expected, **TOLERANCE)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        rms_norm(x, weight, 1e-6, backend="cpu")
    gate_up = torch.randn(6, 3).t()
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gate_up), F.silu(gate) * up, **TOLERANCE)
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    angles = torch.rand(1, 1, 4) * 10  # one position for every token
    cos, sin = angles.cos(), angles.sin()
    q_out, k_out = rotary(q, k, cos, sin)
    for out, t in ((q_out, q), (k_out, k)):
        t1, t2 = t.chunk(2, dim=-1)
        expected = torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)
        torch.testing.assert_close(out, expected, **TOLERANCE)
    with pytest.raises(ValueError, match="cos and sin must be"):
        rotary(q, k, cos, sin, backend="cpu")
    # shapes beyond the documented ones (the torch path's semantics): the same result as backend="torch"
    x, weight = torch.randn(3, 2, 8), torch.rand(2, 8) + 0.5
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm(x, weight, 1e-6, backend="torch"))
    gate_up = torch.randn(2, 3, 8)
    torch.testing.assert_close(silu_mul(gate_up), silu_mul(gate_up, backend="torch"))
    q4, k4, angles = torch.randn(3, 3, 2, 8), torch.randn(3, 3, 1, 8), torch.rand(3, 1, 4)  # (B, N, H, D)
    for out, expected in zip(rotary(q4, k4, angles.cos(), angles.sin()),
                             rotary(q4, k4, angles.cos(), angles.sin(), backend="torch"), strict=True):
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: silu_mul(torch.ones(2, 4), backend="gpu"), "backend must be one of"),
        (lambda: silu_mul(torch.ones(2, 4, dtype=torch.float64), backend="cpu"), "float32 CPU"),
        (lambda: silu_mul(torch.ones(2, 5), backend="cpu"), "even last dim"),
        (lambda: rms_norm(torch.ones(2, 4), torch.ones(3), 1e-6, backend="cpu"), "weight must have 4"),
        (lambda: rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6, torch.ones(3, 4), backend="cpu"),
         "residual must have x's shape"),
        (lambda: rotary(torch.ones(2, 2, 8), torch.ones(2, 1, 8), torch.ones(2, 1, 3), torch.ones(2, 1, 3),
                        backend="cpu"), "cos and sin must be"),
        (lambda: rms_norm(torch.ones(2, 4, requires_grad=True), torch.ones(4), 1e-6, backend="cpu"),
         "no backward"),
        (lambda: rms_norm(torch.tensor(1.0), torch.ones(()), 1e-6), "at least one dim"),
        (lambda: rms_norm(torch.tensor(1.0), torch.ones(()), 1e-6, backend="torch"), "at least one dim"),
        (lambda: rotary(torch.tensor(1.0), torch.ones(2, 1, 8), torch.ones(2, 1, 4), torch.ones(2, 1, 4)),
         "head dim"),
    ],
)
def test_bad_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- Property-based fuzzing (hypothesis) of the C++ ops against float64 formulas ----
# Odd and vector-width-straddling sizes, 1 row to several parallel tasks, strided row views as the model
# hands them over (a shard of a fused projection, every other row), 1 and 2 threads.
FUZZ_ROWS = st.sampled_from([1, 15, 16, 17, 300]) | st.integers(1, 130)
FUZZ_WIDTHS = st.sampled_from([1, 2, 3, 15, 16, 17, 33, 1023, 4097]) | st.integers(1, 200)
FUZZ_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow])


def fuzz_rows(g, rows, width, layout, scale=1.0):
    """(rows, width) fp32: contiguous, a column slice of a wider output, or every other row."""
    if layout == "column-slice":
        return (torch.randn(rows, width + 5, generator=g) * scale)[:, 2 : 2 + width]
    if layout == "every-other-row":
        return (torch.randn(2 * rows, width, generator=g) * scale)[::2]
    return torch.randn(rows, width, generator=g) * scale


LAYOUTS = st.sampled_from(["contiguous", "column-slice", "every-other-row"])


@FUZZ_SETTINGS
@given(rows=FUZZ_ROWS, hidden=FUZZ_WIDTHS, heads=st.sampled_from([None, 1, 3]), with_residual=st.booleans(),
       layout=LAYOUTS, scale=st.sampled_from([1e-3, 1.0, 50.0]), eps=st.sampled_from([1e-6, 0.1]),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_fuzz_rms_norm_cpu_matches_formula(rows, hidden, heads, with_residual, layout, scale, eps, threads,
                                           seed):
    """heads: (N, heads, hidden) input (Qwen3's q/k norm), else (N, hidden)."""
    g = torch.Generator().manual_seed(seed)
    width = hidden * (heads or 1)
    x = fuzz_rows(g, rows, width, layout, scale)
    residual = fuzz_rows(g, rows, width, layout, scale) if with_residual else None
    if heads:
        x, residual = (t if t is None else t.unflatten(-1, (heads, hidden)) for t in (x, residual))
    weight = torch.rand(hidden, generator=g) + 0.5
    result = on_threads(threads, rms_norm, x, weight, eps, residual, backend="cpu")
    total = x.double() + (residual.double() if with_residual else 0)
    expected = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    out = result[0] if with_residual else result
    if with_residual:
        assert torch.equal(result[1], x + residual)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE)


@FUZZ_SETTINGS
@given(rows=FUZZ_ROWS, size=FUZZ_WIDTHS, layout=LAYOUTS, scale=st.sampled_from([1.0, 30.0, 100.0]),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_fuzz_silu_mul_cpu_matches_formula(rows, size, layout, scale, threads, seed):
    gate_up = fuzz_rows(torch.Generator().manual_seed(seed), rows, 2 * size, layout, scale)
    gate, up = gate_up.double().chunk(2, dim=-1)
    out = on_threads(threads, silu_mul, gate_up, backend="cpu")
    torch.testing.assert_close(out.double(), F.silu(gate) * up, **TOLERANCE)


@FUZZ_SETTINGS
@given(rows=FUZZ_ROWS, heads=st.integers(1, 9), kv_heads=st.integers(1, 4),
       half=st.sampled_from([1, 2, 3, 8, 9, 32, 64]), fused=st.booleans(), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_fuzz_rotary_cpu_matches_formula(rows, heads, kv_heads, half, fused, threads, seed):
    """fused: q and k as views of one qkv projection output (row stride past their heads)."""
    g = torch.Generator().manual_seed(seed)
    dim = 2 * half
    if fused:
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim + 3, generator=g)[:, 3:]
        q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q, k = q.unflatten(-1, (heads, dim)), k.unflatten(-1, (kv_heads, dim))
    else:
        q, k = torch.randn(rows, heads, dim, generator=g), torch.randn(rows, kv_heads, dim, generator=g)
    angles = torch.rand(rows, 1, half, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    q_out, k_out = on_threads(threads, rotary, q, k, cos, sin, backend="cpu")
    for out, x in ((q_out, q), (k_out, k)):
        x1, x2 = x.double().chunk(2, dim=-1)
        c, s = cos.double(), sin.double()
        expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        torch.testing.assert_close(out.double(), expected, **TOLERANCE)
