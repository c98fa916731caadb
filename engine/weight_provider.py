"""The weight hook: how a Preference Control Model (or any rule) sets each row's mixture weights."""

from __future__ import annotations

from typing import Protocol

import torch
from mope.engine.model import CausalLM
from torch import Tensor

SIMPLEX_TOLERANCE = 1e-4


class WeightProvider(Protocol):
    """Decides the mixture weights of requests given by preference.

    `model` is run by the engine as one more model over the shared KV pool, on the token ids `prepare`
    returns followed by the response so far; `weights` then maps its last hidden state per row to weights.
    With `model` None the weights depend on `active` only (hidden is None).
    """

    model: CausalLM | None

    def prepare(self, prompt: str, preference: str) -> tuple[list[int], list[bool]]:
        """Token ids the provider's model reads for this request, and its active-expert mask (K,)."""
        ...

    def weights(self, hidden: Tensor | None, active: Tensor) -> Tensor:
        """(B, hidden) or None, (B, K) bool -> (B, K) fp32 weights on the simplex, 0 where not active."""
        ...


def check_simplex(weights: Tensor, active: Tensor, source: str) -> None:
    """Raise ValueError naming `source` unless every row is >= 0, sums to 1 and is 0 where not active."""
    if weights.shape != active.shape:
        raise ValueError(f"{source} gave weights of shape {tuple(weights.shape)}, "
                         f"expected {tuple(active.shape)}")
    off = not torch.isfinite(weights).all() or (weights < 0).any()
    if off or ((weights.sum(-1) - 1).abs() > SIMPLEX_TOLERANCE).any():
        raise ValueError(f"{source} gave weights off the simplex (each row >= 0, summing to 1): "
                         f"{weights.tolist()}")
    if (weights[~active] != 0).any():
        raise ValueError(f"{source} gave nonzero weight to an inactive expert: {weights.tolist()}")
