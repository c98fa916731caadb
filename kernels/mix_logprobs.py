"""mix_logprobs: log pi(token) of the tempered expert mixture, differentiable w.r.t. the mixture weights.

The backward never builds an (N, V) tensor: each backend's forward returns d log pi(token) / d w (N, K)
(prob mode: p_k(tok) / pi(tok); logit mode: (l_k(tok) - E_pi[l_k]) / T), and the backward scales it.
The experts are frozen: no gradient flows to the logits. A weight w_k = 0 means expert k is not in the
mixture (it is never read), so its gradient is 0.
"""

import torch
from torch import Tensor

from .mix_cpu import mix_logprobs_cpu
from .mix_reference import effective_temperature, mix_logprobs_forward_reference
from .mix_sample import resolve_backend
from .validate import (
    check_active_logits,
    check_logits_and_weights,
    check_mode,
    check_temperature,
    check_tokens,
)


class _MixLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights: Tensor, logits: Tensor, tokens: Tensor, temperature: Tensor, mode: str,
                backend: str) -> Tensor:
        logprobs, jacobian = _FORWARDS[backend](logits, weights.detach(), tokens, temperature, mode)
        ctx.save_for_backward(jacobian)
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor):
        (jacobian,) = ctx.saved_tensors
        return grad_logprobs[:, None] * jacobian, None, None, None, None, None


def mix_logprobs(logits: Tensor, weights: Tensor, tokens: Tensor, *, temperature: float | Tensor = 1.0,
                 mode: str = "prob", backend: str = "auto") -> Tensor:
    """log pi(token) (N,) fp32 for logits (K, N, V), weights (N, K) (may require grad), tokens (N,).

    pi is the untruncated mixture of mix_sample at `temperature` (T = 0 counts as T = 1).
    """
    check_mode(mode)
    logits, weights = check_logits_and_weights(logits, weights)
    batch, vocab = logits.shape[1:]
    tokens = check_tokens(tokens, batch, vocab, logits.device)
    temperature = check_temperature(temperature, batch, logits.device)
    backend = resolve_backend(backend, logits.device)
    if backend != "cpu":  # the C++ kernel checks the active logits in its own max pass
        check_active_logits(logits, weights)
    return _MixLogprobs.apply(weights, logits.detach(), tokens, temperature, mode, backend)


def _mix_logprobs_triton(logits: Tensor, weights: Tensor, tokens: Tensor, temperature: Tensor,
                         mode: str) -> tuple[Tensor, Tensor]:
    from .mix_triton import mix_logprobs_triton

    logprobs, token_logp, mean_logp = mix_logprobs_triton(logits, weights, tokens, temperature, mode)
    if mode == "prob":
        return logprobs, (token_logp - logprobs[:, None]).exp()
    jacobian = (token_logp - mean_logp) / effective_temperature(temperature)[:, None]
    return logprobs, torch.where(weights > 0, jacobian, 0.0)


_FORWARDS = {"torch": mix_logprobs_forward_reference, "cpu": mix_logprobs_cpu, "triton": _mix_logprobs_triton}
