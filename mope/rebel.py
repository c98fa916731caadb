"""The REBEL objective and the sequence log-probabilities it needs."""

from __future__ import annotations

import torch
from torch import Tensor


def rebel_loss(new_logp: Tensor, old_logp: Tensor, rewards: Tensor, eta: float) -> Tensor:
    """mean(((new-old)(y) - (new-old)(y') - eta (r(y) - r(y')))^2) over the pairs.

    Inputs are (2P,) with each pair (y, y') adjacent, or (P, 2).
    """
    if not eta > 0:  # NaN too
        raise ValueError(f"eta must be > 0, got {eta}")
    shapes = {t.shape for t in (new_logp, old_logp, rewards)}
    if len(shapes) != 1:
        raise ValueError(f"new_logp, old_logp and rewards must have one shape: {sorted(map(tuple, shapes))}")
    if new_logp.numel() == 0 or new_logp.numel() % 2:
        raise ValueError(f"responses must come in pairs (y, y'): got {new_logp.numel()} log-probs")
    ratio = (new_logp - old_logp.detach()).reshape(-1, 2)
    r = rewards.detach().to(ratio.dtype).reshape(-1, 2)
    return ((ratio[:, 0] - ratio[:, 1]) - eta * (r[:, 0] - r[:, 1])).square().mean()


def mixture_token_logprobs(log_weights: Tensor, expert_logprobs: Tensor) -> Tensor:
    """log sum_k alpha_k exp(expert_logprobs_k) per token: (T, K), (T, K) -> (T,).

    ``log_weights`` is -inf for inactive experts (where ``expert_logprobs`` is -inf too); they drop out
    without a NaN in the gradient.
    """
    if log_weights.shape != expert_logprobs.shape or log_weights.dim() != 2:
        raise ValueError(f"log_weights {tuple(log_weights.shape)} and expert_logprobs "
                         f"{tuple(expert_logprobs.shape)} must both be (T, K)")
    active = torch.isfinite(log_weights)
    terms = torch.where(active, log_weights + expert_logprobs.to(log_weights.dtype), float("-inf"))
    return torch.logsumexp(terms, dim=-1)


def sequence_logprobs(token_logprobs: Tensor, lengths: list[int]) -> Tensor:
    """Sum the concatenated per-token log-probs of each sequence: (sum(lengths),) -> (S,)."""
    if sum(lengths) != token_logprobs.numel():
        raise ValueError(f"lengths sum to {sum(lengths)} but there are {token_logprobs.numel()} log-probs")
    index = torch.repeat_interleave(torch.arange(len(lengths), device=token_logprobs.device),
                                    torch.tensor(lengths, device=token_logprobs.device))
    return torch.zeros(len(lengths), dtype=token_logprobs.dtype, device=token_logprobs.device).index_add(
        0, index, token_logprobs)
