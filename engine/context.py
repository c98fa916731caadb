"""`AttentionContext`: the per-step metadata that every attention layer of a forward reads."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch import Tensor


@dataclass
class AttentionContext:
    """Where the step's tokens come from and where their K/V go.

    Prefill: the new tokens of sequence s are `input_ids[cu_seqlens_q[s]:cu_seqlens_q[s+1]]`, the last
    ones of its `context_lens[s]` tokens (the first ones are a cached prefix, read through
    `block_tables[s]`). Decode: one new token per sequence. `slot_mapping` None: no cache is written.
    Build one per step and do not mutate it: `prefill_spans` is computed once.
    """

    is_prefill: bool
    cu_seqlens_q: Tensor | None = None  # (S+1,) int32, prefill: offsets of each sequence's new tokens
    context_lens: Tensor | None = None  # (S,) int32: tokens of the sequence in the cache after this step
    slot_mapping: Tensor | None = None  # (N,) int64: block * block_size + offset of each new token
    block_tables: Tensor | None = None  # (S, max_blocks) int32

    @cached_property
    def prefill_spans(self) -> list[tuple[int, int, int]]:
        """Prefill: (start, end, total tokens) of each sequence's new tokens, read once per step (a
        device sync on CUDA) rather than once per layer."""
        bounds = self.cu_seqlens_q.tolist()
        totals = self.context_lens.tolist() if self.context_lens is not None else None
        return [
            (start, end, end - start if totals is None else totals[s])
            for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        ]
