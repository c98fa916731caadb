"""`ModelConfig`: the architecture-checked view of a Hugging Face `config.json` that our model code needs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# model_type -> architecture, for a config.json that names no architectures (transformers' Auto classes
# go by model_type alone)
MODEL_TYPE_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
BIASED_ATTENTION = ("LlamaForCausalLM", "Qwen3ForCausalLM")  # architectures that read attention_bias


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None  # rope parameters of a "linear" or "llama3" rope; None: plain rope
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama and Qwen3 with attention_bias (which also biases o_proj)
    o_bias: bool
    mlp_bias: bool  # Llama only
    qk_norm: bool  # Qwen3: RMSNorm over head_dim of q and k before rope
    # Mistral / Qwen sliding-window attention is not implemented: outputs are exact while a sequence
    # is at most this long (the window), and CausalLM.forward refuses positions beyond it. None also for a
    # Qwen model none of whose layers slides.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `path`/config.json (local only) through transformers.AutoConfig and check we support it."""
        from transformers import AutoConfig

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
        return cls.from_hf(AutoConfig.from_pretrained(path, local_files_only=True))

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        """From a transformers config (4.x `rope_theta` + `rope_scaling`, or 5.x `rope_parameters`)."""
        architectures = getattr(hf, "architectures", None) or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if not architectures:
            arch = MODEL_TYPE_ARCHITECTURES.get(getattr(hf, "model_type", None))
        if arch is None:
            raise ValueError(
                f"unsupported architecture {architectures or hf.model_type!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf.hidden_act!r}; supported: 'silu'")
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        rope_theta = float(rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("unsupported partial_rotary_factor != 1")
        if rope_type == "llama3":
            # as transformers 5: a top-level original_max_position_embeddings (Phi-3 style) takes precedence
            if getattr(hf, "original_max_position_embeddings", None) is not None:
                rope["original_max_position_embeddings"] = hf.original_max_position_embeddings
            rope.setdefault("original_max_position_embeddings", hf.max_position_embeddings)
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        num_kv_heads = getattr(hf, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        is_qwen = arch.startswith("Qwen")
        # transformers' Mistral and Qwen2 modules take no attention_bias, and only Llama's MLP has mlp_bias:
        # a config.json that carries the key for another architecture has no such weights
        attention_bias = arch in BIASED_ATTENTION and bool(getattr(hf, "attention_bias", False))
        mlp_bias = arch == "LlamaForCausalLM" and bool(getattr(hf, "mlp_bias", False))
        # Llama never slides (transformers ignores a sliding_window key in its config.json); Qwen slides
        # only with use_sliding_window, and then only in the layers layer_types marks (transformers 5
        # derives them from max_window_layers); a config without layer_types (older transformers) counts
        # as sliding everywhere
        sliding = None if arch == "LlamaForCausalLM" else getattr(hf, "sliding_window", None)
        layer_types = getattr(hf, "layer_types", None)
        if is_qwen and (
            not getattr(hf, "use_sliding_window", False)
            or (layer_types is not None and "sliding_attention" not in layer_types)
        ):
            sliding = None
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            max_position_embeddings=hf.max_position_embeddings,
            rope_theta=rope_theta,
            rope_scaling={"rope_type": rope_type, **rope} if rope_type != "default" else None,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=mlp_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=sliding,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_id=getattr(hf, "eos_token_id", None),
        )

    def rope_inv_freq(self) -> torch.Tensor:
        """(head_dim / 2,) fp32 inverse frequencies of the rotary embedding, rope scaling applied."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if self.rope_scaling is None:
            return inv_freq
        factor = self.rope_scaling["factor"]
        if self.rope_scaling["rope_type"] == "linear":
            return inv_freq / factor
        return _llama3_inv_freq(inv_freq, factor, self.rope_scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, params: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths / factor, short ones kept, a smooth ramp between."""
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
