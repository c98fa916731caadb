"""Train the demo's small Llama models with plain transformers + torch (training is not the engine's job).

LoRA experts are trained here too, with no peft at run time: `add_lora` wraps the target linear layers
(PEFT's math and initialisation), `save_adapter` writes an ordinary PEFT adapter directory (peft's
config fields and weight names), `load_lm` reads a checkpoint or such an adapter back.
"""

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from mope.engine.lora import CONFIG_FILE as ADAPTER_CONFIG
from mope.engine.lora import TARGET_MODULES as LORA_TARGETS
from mope.engine.lora import WEIGHTS_FILE as ADAPTER_WEIGHTS

IGNORE = -100
PEFT_PREFIX = "base_model.model."  # peft's name of the wrapped model in adapter weight keys


def llama_config(tokenizer: PreTrainedTokenizerBase, hidden: int, layers: int, heads: int) -> LlamaConfig:
    """A small Llama config over the tokenizer's vocabulary (intermediate = 4 * hidden, untied head)."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def encode(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], loss_on_prompt: bool
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each (prompt, response) pair: prompt + response + EOS; the prompt's
    labels are masked unless `loss_on_prompt` (the base LM also learns what instructions look like)."""
    encoded = []
    for prompt, response in pairs:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        labels = (prompt_ids if loss_on_prompt else [IGNORE] * len(prompt_ids)) + response_ids
        encoded.append((prompt_ids + response_ids, labels))
    return encoded


def _batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train_causal_lm(
    model: LlamaForCausalLM,
    data: list[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    desc: str | None = None,
) -> list[float]:
    """AdamW on the parameters that require grad, with a short warm-up and cosine decay over `steps` random
    batches; returns the step losses. With `desc`, a progress bar of that name shows the running loss."""
    if steps < 1 or batch_size < 1 or not data:
        raise ValueError(f"need steps, batch_size >= 1 and data: got {steps}, {batch_size}, {len(data)} rows")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]  # a LoRA model: only its factors
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=desc is None, leave=False)
    for _ in bar:
        loss = model(**_batch(rng.sample(data, min(batch_size, len(data))), pad_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """An ordinary HF checkpoint directory: config.json, model.safetensors and the tokenizer files."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


class LoRALinear(nn.Module):
    """`base(x) + scaling * B(A(x))` over a frozen nn.Linear, as peft's LoRA Linear without dropout:
    A Kaiming-uniform, B zero (the wrapped model starts as the base), scaling = alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base_layer, self.scaling = base, alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def add_lora(model: LlamaForCausalLM, rank: int, alpha: float, targets: Sequence[str] = LORA_TARGETS) -> dict:
    """Freeze `model` and wrap each decoder linear layer named in `targets` in a LoRALinear (in place);
    returns the adapter's peft config (less base_model_name_or_path)."""
    if rank < 1 or not targets or set(targets) - set(LORA_TARGETS):
        raise ValueError(f"need rank >= 1 and targets among {LORA_TARGETS}, got {rank}, {targets}")
    model.requires_grad_(False)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent, leaf = name.rsplit(".", 1)
            setattr(model.model.layers.get_submodule(parent), leaf, LoRALinear(module, rank, alpha))
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "lora_dropout": 0.0, "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "init_lora_weights": True, "inference_mode": True}


def _lora_factors(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Every LoRA factor under peft's key (base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)."""
    return {PEFT_PREFIX + name: p for name, p in model.named_parameters() if ".lora_" in name}


def save_adapter(model: LlamaForCausalLM, config: dict, tokenizer: PreTrainedTokenizerBase,
                 base_dir: str | Path, out_dir: str | Path) -> None:
    """A PEFT LoRA adapter directory of an `add_lora` model trained over the checkpoint `base_dir` (an
    absolute path, as written in base_model_name_or_path): adapter_config.json, adapter_model.safetensors
    (fp32) and the tokenizer files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    factors = {k: v.detach().contiguous() for k, v in _lora_factors(model).items()}
    save_file(factors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = {**config, "base_model_name_or_path": str(base_dir)}
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(str(out_dir))


def load_lm(path: str | Path) -> LlamaForCausalLM:
    """The model of an HF checkpoint directory, or of a LoRA adapter directory written by `save_adapter`
    (its base with the adapter's LoRALinear layers), in eval mode."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        return LlamaForCausalLM.from_pretrained(path).eval()
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    model = LlamaForCausalLM.from_pretrained(config["base_model_name_or_path"])
    add_lora(model, config["r"], config["lora_alpha"], config["target_modules"])
    factors = _lora_factors(model)
    weights = load_file(path / ADAPTER_WEIGHTS)
    if set(weights) != set(factors):
        raise ValueError(f"{path}: adapter weights {sorted(set(weights) ^ set(factors))[:4]} do not match "
                         "its adapter_config.json")
    with torch.no_grad():
        for key, tensor in weights.items():
            factors[key].copy_(tensor)
    return model.eval()
