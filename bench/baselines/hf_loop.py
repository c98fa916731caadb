"""The MoPE rollout a user writes today with transformers: K models, one forward each per step.

Each expert keeps its own KV cache (transformers' `cache`, `past_key_values` before 5.x); the mixture is
computed in torch (softmax per expert, weighted sum) and truncated with a sort-based top-p, as transformers'
TopPLogitsWarper. An optional PCM of the same kind runs as one more model each step: its last hidden state
goes through a linear head and a softmax to give the step's weights.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class LoopPCM:
    """A preference control model for the loop: a transformers causal LM and a hidden -> K head."""

    model: nn.Module
    head: nn.Linear

    def weights(self, hidden: Tensor) -> Tensor:
        return torch.softmax(self.head(hidden).float(), dim=-1)


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Zero the tail of each row of `probs` outside the top-p nucleus (sort-based, as TopPLogitsWarper)."""
    sorted_probs, sorted_idx = torch.sort(probs, descending=False, dim=-1)
    cumulative = sorted_probs.cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # keep at least one token
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return probs.masked_fill(remove, 0.0)


def _left_pad(prompts_ids: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    longest = max(len(p) for p in prompts_ids)
    ids = torch.full((len(prompts_ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts_ids), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts_ids):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    return ids, mask


class _CachedModel:
    """One transformers model with its own cache, fed one token per row per step."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.past = None
        # transformers 5 renamed the argument and the output field (the old name warns, then goes)
        parameters = inspect.signature(model.forward).parameters
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"

    def step(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Forward the new tokens `ids` (B, n), `mask` covering the whole sequence; return the last hidden."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         output_hidden_states=True, logits_to_keep=1, **{self.cache_name: self.past})
        self.past = out[self.cache_name]
        self.logits = out.logits[:, -1].float()
        return out.hidden_states[-1][:, -1]


@torch.inference_mode()
def hf_rollout(models: list[nn.Module], pcm: LoopPCM | None, prompts_ids: list[list[int]],
               weights: Tensor | None, max_new_tokens: int, top_p: float = 1.0, temperature: float = 1.0,
               ignore_eos: bool = False, eos_token_id: int | list[int] | None = None,
               generator: torch.Generator | None = None) -> list[list[int]]:
    """Sample up to `max_new_tokens` tokens per prompt from the mixture of `models`.

    `weights` (B, K) are fixed mixture weights, used when `pcm` is None. Temperature 0 is greedy
    (argmax of the mixture). Returns the new tokens of each row, its EOS included.
    """
    if not models:
        raise ValueError("models must hold at least one expert")
    if not prompts_ids or any(len(p) == 0 for p in prompts_ids):
        raise ValueError("prompts_ids must be a non-empty list of non-empty token lists")
    batch, n_experts = len(prompts_ids), len(models)
    if pcm is None:
        if weights is None or tuple(weights.shape) != (batch, n_experts):
            raise ValueError(f"weights must be a ({batch}, {n_experts}) tensor when pcm is None")
        weights = weights.float()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if eos_token_id is None:
        eos_token_id = models[0].config.eos_token_id
    if not ignore_eos and eos_token_id is None:
        raise ValueError("eos_token_id is needed unless ignore_eos")
    eos_ids = [] if ignore_eos else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    experts = [_CachedModel(m) for m in models]
    controller = _CachedModel(pcm.model) if pcm is not None else None
    ids, mask = _left_pad(prompts_ids, pad_id=0)
    new_tokens = torch.empty((batch, 0), dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    for _ in range(max_new_tokens):
        for expert in experts:
            expert.step(ids, mask)
        if controller is not None:
            weights = pcm.weights(controller.step(ids, mask))
        logits = torch.stack([e.logits for e in experts])  # (K, B, V)
        probs = torch.einsum("bk,kbv->bv", weights, torch.softmax(logits / (temperature or 1.0), dim=-1))
        if temperature == 0:
            token = probs.argmax(-1)
        else:
            token = torch.multinomial(top_p_filter(probs, top_p), 1, generator=generator).squeeze(-1)
        if eos_ids:
            token = token.masked_fill(finished, eos_ids[0])
            finished |= torch.isin(token, torch.tensor(eos_ids))
        new_tokens = torch.cat([new_tokens, token[:, None]], dim=1)
        if finished.all():
            break
        ids = token[:, None]
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
    return [_until_eos(row, eos_ids) for row in new_tokens.tolist()]


def _until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    ends = [i for i, token in enumerate(tokens) if token in eos_ids]
    if ends:
        return tokens[: ends[0] + 1]
    return tokens
