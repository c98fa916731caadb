"""Per-request sampling settings."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled. `temperature=0` is greedy; `top_k=0` turns top-k off;
    `n` responses are drawn per prompt, sharing the prompt's KV blocks."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    seed: int = 0
    ignore_eos: bool = False
    n: int = 1

    def __post_init__(self) -> None:
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float)
                or not 0 <= self.temperature < math.inf):
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, "
                             f"got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        for name, low in (("top_k", 0), ("max_tokens", 1), ("n", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SamplingParams.{name} must be an int >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SamplingParams.seed must be an int, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be a bool, got {self.ignore_eos!r}")
