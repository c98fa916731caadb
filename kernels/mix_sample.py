"""mix_sample: draw the next token of each row from the weighted mixture of K experts' distributions.

One dispatcher over three backends with the same semantics (DESIGN.md): "torch" (kernels/mix_reference.py,
the spec), "cpu" (csrc/mix_sample.cpp) and "triton" (kernels/mix_triton.py). All draw u from the row's
Philox stream (seed, offset), so they agree token for token up to float rounding at a CDF boundary.
"""

import os
from typing import NamedTuple

import torch
from torch import Tensor

from .mix_cpu import cpu_module, mix_sample_cpu
from .mix_reference import mix_sample_reference
from .validate import check_active_logits, validate_mix_sample_args

BACKENDS = ("auto", "torch", "cpu", "triton")


class MixSample(NamedTuple):
    tokens: Tensor  # (B,) int64
    logprobs: Tensor  # (B,) fp32: log pi(token) of the untruncated tempered mixture
    expert_logprobs: Tensor  # (B, K) fp32: log softmax(z_k / T)(token), -inf where w_k = 0


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs: "auto" is triton on CUDA, else cpu; cpu is torch when C++ cannot be built."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs logits on the CPU, got {device}")
        if cpu_module() is None:  # load_cpp warned once
            return "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' needs logits on CUDA (or TRITON_INTERPRET=1), got {device}")
    return backend


def mix_sample(logits: Tensor, weights: Tensor, *, temperature: float | Tensor, top_p: float | Tensor,
               top_k: int | Tensor, seed: int | Tensor, offset: int | Tensor, mode: str = "prob",
               backend: str = "auto") -> MixSample:
    """Sample one token per row from the mixture of the experts' next-token distributions.

    logits (K, B, V) fp32/bf16/fp16; weights (B, K) fp32 on the simplex; temperature (T = 0: greedy), top_p,
    top_k (0 = off), seed and offset: numbers or (B,) tensors; mode "prob" (sum_k w_k softmax(z_k / T)) or
    "logit" (softmax(sum_k w_k log_softmax(z_k) / T)). Bad arguments raise ValueError naming them.
    """
    args = validate_mix_sample_args(logits, weights, temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=seed, offset=offset, mode=mode, check_logits=False)
    backend = resolve_backend(backend, args.logits.device)
    if backend == "cpu":  # the C++ kernel checks the active logits in its own max pass
        return MixSample(*mix_sample_cpu(*args))
    check_active_logits(args.logits, args.weights)
    if backend == "torch":
        return MixSample(*mix_sample_reference(*args))
    from .mix_triton import mix_sample_triton

    return MixSample(*mix_sample_triton(*args))
