"""decoder_ops (RMSNorm with residual, rotary, SiLU-gated product): each backend against an independent
reference (transformers' Llama modules and plain formulas), shapes as the model hands them over."""

import pytest
import torch
import torch.nn.functional as F
from mope.kernels.decoder_ops import rms_norm, rotary, silu_mul
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

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
    ],
)
def test_bad_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
