"""Model shapes for the benchmarks, and random-weight checkpoints of them (no hub needed).

`make_random_checkpoint` writes a directory that `transformers` and `mope.engine` both load:
config.json, model.safetensors and a character-level tokenizer whose vocabulary has exactly the
model's `vocab_size` entries (so every sampled id decodes).
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from mope.engine.lora import TARGET_MODULES


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048

    def num_params(self) -> int:
        """Parameters of an untied Llama of this shape (embedding and head included)."""
        head_dim = self.hidden_size // self.num_attention_heads
        attn = self.hidden_size * head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size
        layers = self.num_hidden_layers * (attn + mlp + norms)
        return 2 * self.vocab_size * self.hidden_size + layers + self.hidden_size


SHAPES: dict[str, Shape] = {
    "tiny": Shape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, max_position_embeddings=512),
    # The paper's PCM size (JackFram/llama-160m): 162 M parameters.
    "llama-160m": Shape(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                        intermediate_size=3072, vocab_size=32000),
}

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def _config(shape: Shape, arch: str):
    from transformers import AutoConfig

    fields = asdict(shape)
    extra = {"head_dim": shape.hidden_size // shape.num_attention_heads} if arch == "qwen3" else {}
    return AutoConfig.for_model(arch, **fields, **extra, bos_token_id=1, eos_token_id=2,
                                tie_word_embeddings=False, torch_dtype="float32")


def _tokenizer(vocab_size: int):
    """A character-level tokenizer (sentencepiece-style "▁" for spaces) with `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["▁"] + [c for c in string.printable if not c.isspace()]
    words = list(SPECIAL_TOKENS) + chars
    if vocab_size < len(words):
        raise ValueError(f"vocab_size={vocab_size} is below the {len(words)} character tokens")
    words += [f"<extra_{i}>" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.BPE({w: i for i, w in enumerate(words)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_random_checkpoint(directory: str | Path, shape: str | Shape, arch: str = "llama",
                           seed: int = 0) -> Path:
    """Write a random-weight `arch` checkpoint of `shape` (a name of SHAPES or a Shape) to `directory`.

    Reuses the directory when it already holds the same shape, arch and seed.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
        shape = SHAPES[shape]
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    directory = Path(directory)
    stamp = {"shape": asdict(shape), "arch": arch, "seed": seed}
    stamp_file = directory / "random_checkpoint.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(shape, arch), dtype=torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    _tokenizer(shape.vocab_size).save_pretrained(directory)
    stamp_file.write_text(json.dumps(stamp))
    return directory


def make_random_adapter(directory: str | Path, base_dir: str | Path, shape: str | Shape, rank: int = 16,
                        seed: int = 0) -> Path:
    """Write a random PEFT LoRA adapter of a `shape` base: all seven projections, `rank`, alpha = 2 * rank."""
    from safetensors.torch import save_file

    shape = SHAPES[shape] if isinstance(shape, str) else shape
    head_dim = shape.hidden_size // shape.num_attention_heads
    hidden, inter = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
    dims = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for layer in range(shape.num_hidden_layers):
        for module in TARGET_MODULES:
            fan_in, fan_out = dims[module]
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            factors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            factors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(factors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGET_MODULES),
              "bias": "none", "base_model_name_or_path": str(base_dir), "task_type": "CAUSAL_LM"}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory
