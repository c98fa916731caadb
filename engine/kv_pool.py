"""One pool of KV blocks for every model: one buffer, per model and layer (k_cache, v_cache) strided views."""

from __future__ import annotations

import torch
from mope.engine.config import ModelConfig
from torch import Tensor


def block_numel(configs: list[ModelConfig], block_size: int) -> int:
    """Elements of one block: block_size tokens of K and V, all layers, of the largest model."""
    return max(2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim for c in configs)


class KVPool:
    """`num_blocks` blocks of `block_numel` elements; a block holds one (sequence, model) pair's
    `block_size` tokens. `views[m][layer]` is model m's (k_cache, v_cache) for that layer, each of shape
    (num_blocks, block_size, Hkv, D) with the block stride of the pool."""

    def __init__(self, configs: list[ModelConfig], num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str | torch.device):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        numel = block_numel(configs, block_size)
        self.buffer = torch.zeros(num_blocks, numel, dtype=dtype, device=device)
        self.views = [self._model_views(c, block_size) for c in configs]

    def _model_views(self, config: ModelConfig, block_size: int) -> list[tuple[Tensor, Tensor]]:
        heads, dim = config.num_kv_heads, config.head_dim
        shape = (self.buffer.shape[0], block_size, heads, dim)
        stride = (self.buffer.shape[1], heads * dim, dim, 1)
        plane = block_size * heads * dim  # one layer's K (or V) of one block
        return [(self.buffer.as_strided(shape, stride, 2 * layer * plane),
                 self.buffer.as_strided(shape, stride, (2 * layer + 1) * plane))
                for layer in range(config.num_layers)]

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's KV, all models and layers (copy-on-write)."""
        self.buffer[dst].copy_(self.buffer[src])
