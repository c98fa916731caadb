"""The small ops of a decoder layer between its GEMMs: RMSNorm (with the residual add), rotary embedding,
and the SiLU-gated product of the MLP.

Backends: "torch" (the reference, and the path with autograd) and "cpu" (csrc/decoder_ops.cpp, fp32: one
pass per op over its rows, new output tensors). In a decode step the torch versions are ~30 dispatches
per layer, each finding its few rows evicted by the GEMM before it (bench/README.md, "decoder ops").
"auto": cpu for fp32 CPU tensors in the shapes and layout the C++ reads (the documented dims, last dim
contiguous; rope's cos and sin one row per token) when autograd is off or nothing requires a gradient,
torch otherwise (also when the C++ build failed: load_cpp has warned once). "cpu" refuses other shapes
and layouts with a ValueError naming them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpp_build import load_cpp

BACKENDS = ("auto", "torch", "cpu")


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None, *,
             backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm of x's last dim times `weight`; with `residual`: (norm(x + residual), x + residual), the
    pre-norm block's fused step."""
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the normalised one), got a 0-d tensor")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    module = _cpp_module(backend, (x, weight, residual),
                         weight.dim() == 1 and _last_dim_contiguous(x, weight, residual))
    if module is not None:
        if x.dim() == 2:  # the engine's (N, hidden) rows
            out, total = module.rms_norm(x, weight, eps, residual)
            return out if residual is None else (out, total)
        rows = x.reshape(-1, x.shape[-1])  # e.g. Qwen3's q/k norm over (N, H, D)
        residual_rows = None if residual is None else residual.reshape(rows.shape)
        out, total = module.rms_norm(rows, weight, eps, residual_rows)
        return out.view(x.shape) if residual is None else (out.view(x.shape), total.view(x.shape))
    if residual is None:
        return F.rms_norm(x, weight.shape, weight, eps)
    x = x + residual
    return F.rms_norm(x, weight.shape, weight, eps), x


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Rotate-half rope of q (N, Hq, D) and k (N, Hk, D) by cos, sin (N, 1, D/2): the two halves of the
    head dim are the (real, imaginary) parts. Returns new tensors."""
    if q.dim() == 0 or k.dim() == 0:
        raise ValueError(f"q and k must have a head dim, got {q.dim()}-d and {k.dim()}-d tensors")
    fits = (q.dim() == k.dim() == 3 and _last_dim_contiguous(q, k)  # cos, sin: one row per token
            and cos.shape == sin.shape == (q.shape[0], 1, q.shape[-1] // 2) and cos.is_contiguous()
            and sin.is_contiguous())
    module = _cpp_module(backend, (q, k, cos, sin), fits)
    if module is not None:
        q_out, k_out = module.rotary(q, k, cos.flatten(1), sin.flatten(1))
        return q_out, k_out
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_mul(gate_up: Tensor, *, backend: str = "auto") -> Tensor:
    """(N, 2I) [gate | up] -> (N, I) silu(gate) * up."""
    module = _cpp_module(backend, (gate_up,), gate_up.dim() == 2 and _last_dim_contiguous(gate_up))
    if module is not None:
        return module.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _last_dim_contiguous(*tensors: Tensor | None) -> bool:
    return all(t is None or t.stride(-1) == 1 for t in tensors)


def _cpp_module(backend: str, tensors: tuple[Tensor | None, ...], layout_fits: bool):
    """The C++ module when `backend` ("auto" or "cpu") applies to these tensors, else None (torch). With
    "cpu" a layout that does not fit reaches the C++, whose checks name it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return None
    given = [t for t in tensors if t is not None]
    fits = all(t.is_cpu and t.dtype == torch.float32 for t in given)
    if backend == "cpu" and not fits:
        raise ValueError("backend='cpu' needs float32 CPU tensors, got "
                         + ", ".join(f"{t.dtype} on {t.device}" for t in given))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in given)
    if backend == "cpu" and needs_grad:
        raise ValueError("backend='cpu' has no backward: use 'torch' or 'auto' for tensors needing gradients")
    if not fits or needs_grad or (backend == "auto" and not layout_fits):
        return None
    return load_cpp("decoder_ops")
