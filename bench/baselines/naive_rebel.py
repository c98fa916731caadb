"""The REBEL step a user writes today with transformers (the baseline of bench/train.py).

Rollout: the HF loop of hf_loop.py (K expert models and the PCM, one forward each per token).
Update: a full teacher-forced forward of every expert over prompt + response (full-vocabulary
log-softmax) to get log p_k(y_t), the PCM forward with gradients, the prob-mode mixture, rebel_loss.
The old log-probs come from the same computation without gradients before the first epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bench.baselines.hf_loop import LoopPCM, hf_rollout
from mope.rebel import rebel_loss


def _right_pad(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), longest), dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def naive_sequence_logprobs(experts: list[nn.Module], pcm: LoopPCM, prompts: list[list[int]],
                            responses: list[list[int]]) -> Tensor:
    """log pi(y) per response (B,): every expert's full forward, the PCM's forward (with grad if enabled)."""
    ids, mask = _right_pad([p + r for p, r in zip(prompts, responses, strict=True)])
    targets = ids[:, 1:]
    response_mask = torch.zeros_like(targets, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        response_mask[i, len(p) - 1 : len(p) - 1 + len(r)] = True
    with torch.no_grad():
        expert_lp = torch.stack([
            m(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            .gather(-1, targets[..., None])[..., 0]
            for m in experts], dim=-1)  # (B, L-1, K)
    pcm_out = pcm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden = pcm_out.hidden_states[-1][:, :-1]
    log_w = pcm.head(hidden).float().log_softmax(-1)
    token_lp = torch.logsumexp(log_w + expert_lp, dim=-1)
    return (token_lp * response_mask).sum(-1)


def naive_rebel_step(experts: list[nn.Module], pcm: LoopPCM, optimizer: torch.optim.Optimizer,
                     prompts: list[list[int]], reward_fn: Callable[[list[list[int]]], Tensor], *,
                     max_new_tokens: int, epochs: int, eta: float = 1.0, temperature: float = 1.0,
                     grad_clip: float = 1.0, generator: torch.Generator | None = None) -> dict:
    """One REBEL step on two sampled responses per prompt; returns the phase times and token counts."""
    rows = [p for p in prompts for _ in range(2)]
    start = time.perf_counter()
    responses = hf_rollout(experts, pcm, rows, None, max_new_tokens, temperature=temperature,
                           ignore_eos=True, generator=generator)
    rolled = time.perf_counter()
    rewards = reward_fn(responses)
    with torch.no_grad():
        old = naive_sequence_logprobs(experts, pcm, rows, responses)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(epochs):
        loss = rebel_loss(naive_sequence_logprobs(experts, pcm, rows, responses), old, rewards, eta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    done = time.perf_counter()
    tokens = sum(len(r) for r in responses)
    return {"rollout_s": rolled - start, "update_s": done - rolled, "tokens": tokens, "loss": loss.item()}
