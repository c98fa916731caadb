"""Torch reference of mix_sample and mix_logprobs: written for clarity, it is the spec the kernels follow.

Arguments are the validated ones (kernels/validate.py): per-row tensors of shape (B,).
Per row b, with T = temperature[b] (T = 0: greedy, computed with T = 1):
  p_k = softmax(z_k / T) for every active expert (w_k > 0; an inactive expert is never read)
  prob mode:  pi = sum_k w_k p_k
  logit mode: pi = softmax(sum_k w_k log_softmax(z_k) / T)
Truncation of pi: keep v iff #(tokens strictly more probable) < top_k (top_k > 0), then, within the
kept set renormalised, keep v iff the mass strictly above pi(v) is < top_p (ties are kept together).
Draw: u = philox_uniform(seed, offset); the token is the first v, in vocabulary order, whose running
sum of kept mass exceeds u * (kept mass). Greedy rows take the argmax of pi (lowest index on ties).
"""

import torch
from torch import Tensor

from .philox import philox_uniform


def effective_temperature(temperature: Tensor) -> Tensor:
    """T, with the greedy rows' T = 0 replaced by 1 (their distribution is the T = 1 mixture)."""
    return torch.where(temperature > 0, temperature, torch.ones_like(temperature))


def active_rows(weights: Tensor, expert: int) -> Tensor:
    return (weights[:, expert].detach() > 0).nonzero().squeeze(1)


def expert_log_softmax(logits: Tensor, rows: Tensor, expert: int, temperature: Tensor) -> Tensor:
    """log softmax(z_k / T) (n, V) fp32 over the given rows of one expert (temperature per row, (n,))."""
    z = logits[expert].index_select(0, rows).float()
    return torch.log_softmax(z / temperature.index_select(0, rows)[:, None], dim=-1)


def mixture(logits: Tensor, weights: Tensor, temperature: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """(pi, log pi), both (B, V) fp32, of the untruncated tempered mixture; differentiable w.r.t. weights."""
    num_experts, batch, vocab = logits.shape
    t = effective_temperature(temperature)
    one = torch.ones_like(t)
    mixed = logits.new_zeros((batch, vocab), dtype=torch.float32)
    for k in range(num_experts):
        rows = active_rows(weights, k)
        w = weights[:, k].index_select(0, rows)[:, None]
        if mode == "prob":
            mixed = mixed.index_add(0, rows, w * expert_log_softmax(logits, rows, k, t).exp())
        else:
            mixed = mixed.index_add(0, rows, w * expert_log_softmax(logits, rows, k, one))
    if mode == "prob":
        return mixed, mixed.log()
    log_pi = torch.log_softmax(mixed / t[:, None], dim=-1)
    return log_pi.exp(), log_pi


def truncation_mask(probs: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Tokens kept by top-k then top-p (B, V) bool, from probabilities (B, V) (any positive scale)."""
    vocab = probs.shape[-1]
    probs = probs.double()
    # Tokens strictly more probable than v: those after v's last tie in ascending order.
    ascending = probs.sort(dim=-1).values
    strictly_greater = vocab - torch.searchsorted(ascending, probs, right=True)
    keep = (top_k[:, None] == 0) | (strictly_greater < top_k[:, None])
    kept = torch.where(keep, probs, 0.0)
    # Mass strictly above v within the kept set: the exclusive prefix sum, in descending order, at the
    # position of v's first tie, which is the number of kept tokens strictly more probable than v.
    descending = kept.sort(dim=-1, descending=True).values
    exclusive = torch.cumsum(descending, dim=-1) - descending
    ascending_kept = descending.flip(-1)
    first_tie = vocab - torch.searchsorted(ascending_kept, kept, right=True)
    mass_above = exclusive.gather(-1, first_tie)
    total = descending.sum(dim=-1, keepdim=True)
    return keep & (mass_above < top_p[:, None].double() * total) & (kept > 0)


def inverse_cdf(probs: Tensor, keep: Tensor, u: Tensor) -> Tensor:
    """First kept token, in vocabulary order, whose running kept mass exceeds u * (kept mass)."""
    cumulative = torch.where(keep, probs.double(), 0.0).cumsum(dim=-1)
    target = u.double()[:, None] * cumulative[:, -1:]
    token = torch.searchsorted(cumulative, target, right=True).squeeze(1)
    last_kept = probs.shape[-1] - 1 - keep.flip(-1).int().argmax(dim=-1)
    return torch.minimum(token, last_kept)


def expert_logprobs_at(logits: Tensor, weights: Tensor, tokens: Tensor, temperature: Tensor) -> Tensor:
    """log softmax(z_k / T)(token) (B, K) fp32, -inf where w_k = 0."""
    num_experts, batch, _ = logits.shape
    t = effective_temperature(temperature)
    out = torch.full((batch, num_experts), float("-inf"), dtype=torch.float32, device=logits.device)
    for k in range(num_experts):
        rows = active_rows(weights, k)
        log_p = expert_log_softmax(logits, rows, k, t)
        out[rows, k] = log_p.gather(-1, tokens.index_select(0, rows)[:, None]).squeeze(1)
    return out


def mix_logprobs_reference(logits: Tensor, weights: Tensor, tokens: Tensor, temperature: Tensor,
                           mode: str) -> Tensor:
    """log pi(token) (N,) of the untruncated tempered mixture; differentiable w.r.t. weights (0 where
    w_k = 0). Prob mode: logsumexp_k (log w_k + log p_k(token)), finite where pi(token) underflows fp32
    (as in the kernels)."""
    if mode != "prob":
        return mixture(logits, weights, temperature, mode)[1].gather(-1, tokens[:, None]).squeeze(1)
    active = weights.detach() > 0
    log_w = torch.where(active, weights, torch.ones_like(weights)).log()
    log_p = expert_logprobs_at(logits, weights, tokens, temperature)
    return torch.logsumexp(torch.where(active, log_w + log_p, float("-inf")), dim=1)


def mix_sample_reference(logits: Tensor, weights: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor,
                         seed: Tensor, offset: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens int64 (B,), logprobs fp32 (B,), expert_logprobs fp32 (B, K)) as in DESIGN.md."""
    probs, _ = mixture(logits, weights, temperature, mode)
    keep = truncation_mask(probs, top_k, top_p)
    sampled = inverse_cdf(probs, keep, philox_uniform(seed, offset))
    greedy = probs.argmax(dim=-1)
    tokens = torch.where(temperature > 0, sampled, greedy)
    logprobs = mix_logprobs_reference(logits, weights, tokens, temperature, mode)
    return tokens, logprobs, expert_logprobs_at(logits, weights, tokens, temperature)


def mix_logprobs_forward_reference(logits: Tensor, weights: Tensor, tokens: Tensor, temperature: Tensor,
                                   mode: str) -> tuple[Tensor, Tensor]:
    """(log pi(token) (N,), d log pi(token) / d weights (N, K)) in closed form; 0 where w_k = 0.

    prob:  d log pi(tok) / d w_k = p_k(tok) / pi(tok)
    logit: d log pi(tok) / d w_k = (l_k(tok) - E_pi[l_k]) / T, with l_k = log_softmax(z_k)
    """
    weights = weights.detach()
    probs, _ = mixture(logits, weights, temperature, mode)
    logprobs = mix_logprobs_reference(logits, weights, tokens, temperature, mode)
    jacobian = torch.zeros_like(weights)
    t = effective_temperature(temperature)
    for k in range(logits.shape[0]):
        rows = active_rows(weights, k)
        tok = tokens.index_select(0, rows)[:, None]
        if mode == "prob":
            log_p = expert_log_softmax(logits, rows, k, t).gather(-1, tok).squeeze(1)
            jacobian[rows, k] = (log_p - logprobs.index_select(0, rows)).exp()
        else:
            log_p = expert_log_softmax(logits, rows, k, torch.ones_like(t))
            pi = probs.index_select(0, rows)
            expected = torch.where(pi > 0, pi * log_p, 0.0).sum(dim=-1)
            jacobian[rows, k] = (log_p.gather(-1, tok).squeeze(1) - expected) / t.index_select(0, rows)
    return logprobs, jacobian
