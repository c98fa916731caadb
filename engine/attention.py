"""Attention over a step's flattened tokens: write K/V into the paged cache, then prefill or paged decode."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mope.kernels.paged_attention import paged_decode_attention, store_kv
from torch import Tensor

from .context import AttentionContext


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ctx: AttentionContext,
    kv_cache: tuple[Tensor, Tensor] | None,
    scale: float,
) -> Tensor:
    """q (N, Hq, D), k and v (N, Hkv, D) of the step's new tokens, rope applied -> (N, Hq, D).

    With a cache, the new K/V are first stored at `ctx.slot_mapping`. Prefill attends causally within
    each sequence (over its cached prefix too); decode attends through the block tables.
    """
    if kv_cache is not None and ctx.slot_mapping is not None:
        store_kv(k, v, kv_cache[0], kv_cache[1], ctx.slot_mapping)
    if ctx.is_prefill:
        return prefill_attention(q, k, v, ctx, kv_cache, scale)
    if kv_cache is None:
        raise ValueError("a decode step needs kv_cache (the new token attends to the cached ones)")
    return paged_decode_attention(
        q, kv_cache[0], kv_cache[1], ctx.block_tables, ctx.context_lens, scale=scale
    )


def prefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ctx: AttentionContext,
    kv_cache: tuple[Tensor, Tensor] | None,
    scale: float,
) -> Tensor:
    """Causal attention per sequence; a sequence with a cached prefix reads its K/V from the cache."""
    outputs = []
    for s, (start, end, total) in enumerate(ctx.prefill_spans):
        new = end - start
        if total == new:
            keys, values, mask = k[start:end], v[start:end], None
        else:
            if kv_cache is None:
                raise ValueError(
                    f"sequence {s} has a cached prefix (context_lens {total} > {new} new tokens) "
                    "but kv_cache is None"
                )
            keys, values = gather_kv(kv_cache, ctx.block_tables[s], total)
            # new token i sits at position total - new + i and sees keys 0 .. total - new + i
            mask = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(diagonal=total - new)
        outputs.append(_sdpa(q[start:end], keys, values, mask, scale))
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def gather_kv(kv_cache: tuple[Tensor, Tensor], block_table: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """The first `length` cached K and V rows of one sequence: (length, Hkv, D) each."""
    k_cache, v_cache = kv_cache
    blocks = block_table[: -(-length // k_cache.shape[1])].long()
    return k_cache[blocks].flatten(0, 1)[:length], v_cache[blocks].flatten(0, 1)[:length]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """(L, Hq, D) x (S, Hkv, D) -> (L, Hq, D); causal (top-left aligned, L == S) when mask is None."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)
