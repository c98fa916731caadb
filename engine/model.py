"""`CausalLM`: Llama / Mistral / Qwen2 / Qwen3 decoder over a step's flattened tokens (nano-vllm style).

q/k/v and gate/up projections are fused (`MergedLinear`); the checkpoint's separate weights are copied
into their row shards at load time (`PACKED_MODULES`, used by the loader).
"""

from __future__ import annotations

import torch
from mope.kernels.decode_layers import available as decode_layers_available
from mope.kernels.decode_layers import decode_call, decode_layers
from mope.kernels.decode_layers import layer as decode_layer
from mope.kernels.decoder_ops import rms_norm, rotary, silu_mul
from torch import Tensor, nn

from .attention import attention
from .config import ModelConfig
from .context import AttentionContext
from .linear import Linear, fast_linear

# checkpoint module name -> (our fused module, shard index)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _global_hooks() -> bool:
    """Whether forward hooks are registered for every module (torch.nn.modules.module.register_module_*)."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


class MergedLinear(Linear):
    """A linear layer whose output rows are the concatenation of several checkpoint layers' rows."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = shard_sizes

    def shard(self, param: Tensor, index: int) -> Tensor:
        """The rows of `param` (this layer's weight or bias) that belong to shard `index`."""
        start = sum(self.shard_sizes[:index])
        return param[start : start + self.shard_sizes[index]]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """norm(x); with `residual`: (norm(x + residual), x + residual), the pre-norm block's fused step."""
        return rms_norm(x, self.weight, self.eps, residual)


def rotary_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of position * inv_freq, (N, 1, D/2) in `dtype` (fp32 angles, as transformers)."""
    angles = positions[:, None].float() * inv_freq
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = MergedLinear(config.hidden_size, self.qkv_sizes, bias=config.qkv_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        ctx: AttentionContext,
        kv_cache: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, k, cos, sin)
        return self.o_proj(attention(q, k, v, ctx, kv_cache, self.scale).flatten(1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], bias=config.mlp_bias)
        self.down_proj = Linear(size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None,
        cos: Tensor,
        sin: Tensor,
        ctx: AttentionContext,
        kv_cache: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, ctx, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder + LM head. Parameter names follow the checkpoint's, with q/k/v and gate/up fused."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Transformer(config)
        self.lm_head = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.register_buffer("inv_freq", config.rope_inv_freq(), persistent=False)

    @classmethod
    def empty(cls, config: ModelConfig, device: str | torch.device, dtype: torch.dtype) -> CausalLM:
        """A model with uninitialised `dtype` weights on `device` (no random init), fp32 rope frequencies."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device).to(dtype)
        model.inv_freq = config.rope_inv_freq().to(device)
        return model

    # a LoRAGroup's StepRows while one is over this model: its step's adapter_index goes into the one call
    lora_step = None

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        ctx: AttentionContext,
        kv_cache: list[tuple[Tensor, Tensor]] | None,
    ) -> Tensor:
        """input_ids, positions (N,) int64: the step's tokens, sequences concatenated -> (N, hidden)."""
        x, cos, sin = self._embed(input_ids, positions, kv_cache)
        one_call = self._may_decode_in_one_call(ctx, kv_cache, x)
        call = self._decode_call(x, cos, sin, ctx, kv_cache) if one_call else None
        if call is not None:
            return decode_layers([call])[0]
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, cos, sin, ctx, None if kv_cache is None else kv_cache[i])
        return self.model.norm(x) if residual is None else self.model.norm(x, residual)[0]  # None: no layers

    def decode_call(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext,
                    kv_cache: list[tuple[Tensor, Tensor]] | None):
        """`forward` as a call for `mope.kernels.decode_layers.decode_layers`, which runs several models'
        calls side by side; None where the one-call path does not apply (see `_decode_layers`)."""
        if not self._may_decode_in_one_call(ctx, kv_cache, input_ids):  # before any work: CUDA steps ask too
            return None
        return self._decode_call(*self._embed(input_ids, positions, kv_cache), ctx, kv_cache)

    def _may_decode_in_one_call(self, ctx: AttentionContext, kv_cache: list[tuple[Tensor, Tensor]] | None,
                                tokens: Tensor) -> bool:
        """What the one-call path needs that costs nothing to check: a CPU decode step with a cache to write,
        some layers, autograd off, the C++ built."""
        return (not ctx.is_prefill and kv_cache is not None and ctx.slot_mapping is not None and tokens.is_cpu
                and len(self.model.layers) > 0 and not torch.is_grad_enabled() and decode_layers_available())

    def _embed(self, input_ids: Tensor, positions: Tensor,
               kv_cache: list[tuple[Tensor, Tensor]] | None) -> tuple[Tensor, Tensor, Tensor]:
        """The checked inputs' embeddings and their rope cos, sin (N, 1, D/2)."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must be (N,), got {tuple(input_ids.shape)} and "
                f"{tuple(positions.shape)}"
            )
        if kv_cache is not None and len(kv_cache) != self.config.num_layers:
            raise ValueError(
                f"kv_cache must hold one (k, v) pair per layer ({self.config.num_layers}), "
                f"got {len(kv_cache)}"
            )
        window = self.config.sliding_window
        if window is not None and len(positions) and int(positions.max()) >= window:
            raise ValueError(
                f"position {int(positions.max())} is beyond the sliding window ({window} tokens), which is "
                "not implemented: keep sequences within the window"
            )
        x = self.model.embed_tokens(input_ids)
        return x, *rotary_cos_sin(positions, self.inv_freq, x.dtype)

    def _decode_call(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext,
                     kv_cache: list[tuple[Tensor, Tensor]]):
        """The call of a step that passed `_may_decode_in_one_call`, or None (see `_decode_layers`)."""
        layers = self._decode_layers(x)
        if layers is None:
            return None
        attn, step = self.model.layers[0].self_attn, self.lora_step
        rows = None if step is None else step.rows
        return decode_call(x, cos.flatten(1), sin.flatten(1), layers, self.model.norm.weight,
                           self.config.rms_norm_eps, kv_cache, ctx.slot_mapping, ctx.block_tables,
                           ctx.context_lens, num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
                           head_dim=attn.head_dim, scale=attn.scale,
                           adapter_index=None if rows is None else rows.adapter_index)

    def _decode_layers(self, x: Tensor) -> list | None:
        """The layers as `decode_layers` takes them when each of their ops would run its C++ kernel on x's
        rows anyway (CPU, fp32, no autograd, the packed GEMM; no module hooks to run, this one's included):
        one call, same result. None: run them one by one."""
        if x.dtype != torch.float32:
            return None
        if _global_hooks() or any(m._forward_hooks or m._forward_pre_hooks for m in self.modules()):
            return None
        layers = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = [p.decode_projection(x) if hasattr(p, "decode_projection") else None
                           for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            if hasattr(attn, "q_norm"):
                norms += [attn.q_norm.weight, attn.k_norm.weight]
            if None in projections or any(w.dtype != torch.float32 for w in norms):
                return None
            layers.append(decode_layer(*norms[:2], *projections, *norms[2:]))
        return layers

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """(M, hidden) -> (M, vocab) fp32 logits."""
        if self.lm_head is None:
            return fast_linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
