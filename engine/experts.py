"""Load the experts: full checkpoints, and PEFT LoRA adapters served over one shared base (one forward)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from mope.engine.config import ModelConfig
from mope.engine.context import AttentionContext
from mope.engine.loader import TOKENIZER_FILES, load_model, load_tokenizer
from mope.engine.lora import CONFIG_FILE, LoRAGroup, read_adapter_config
from torch import Tensor, nn


@dataclass
class ForwardGroup:
    """Models the runner forwards in one call: a CausalLM (one member, adapter -1), or a LoRAGroup whose
    members are its adapters (and its plain base, adapter -1, when that is an expert too)."""

    module: nn.Module
    members: dict[int, int]  # model index -> adapter index (-1: the plain base)


class AdapterExpert(nn.Module):
    """Adapter `index` of a LoRAGroup, called like a CausalLM (for teacher-forced scoring)."""

    def __init__(self, group: LoRAGroup, index: int):
        super().__init__()
        self.group, self.index, self.config = group, index, group.base.config

    def forward(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext,
                kv_cache: list[tuple[Tensor, Tensor]] | None) -> Tensor:
        return self.group(input_ids, positions, ctx, kv_cache, torch.full_like(input_ids, self.index))

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.group.compute_logits(hidden)


def adapter_base(path: Path) -> Path | None:
    """The local base checkpoint of a PEFT adapter directory; None when `path` is not an adapter."""
    if not (path / CONFIG_FILE).is_file():
        return None
    base = read_adapter_config(path).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise ValueError(f"{path}: adapter's base_model_name_or_path={base!r} is not a local checkpoint "
                         "directory (the engine loads nothing from the network)")
    return Path(base).resolve()


def tokenizer_dir(path: Path, base: Path | None) -> Path:
    """Where the tokenizer of checkpoint `path` is: its own files, or those of `base` (an adapter's, None
    for a full checkpoint) when it has none."""
    if base is None or any((path / name).is_file() for name in TOKENIZER_FILES):
        return path
    return base


def expert_config_and_tokenizer(path: Path) -> tuple[ModelConfig, object]:
    """Config and tokenizer of an expert (an adapter: its base's config, its own tokenizer if it has one)."""
    base = adapter_base(path)
    return ModelConfig.from_pretrained(base or path), load_tokenizer(tokenizer_dir(path, base))


def load_experts(paths: list[Path], device: torch.device, dtype: torch.dtype
                 ) -> tuple[list[nn.Module], list[ForwardGroup]]:
    """Every expert as a CausalLM-like module, and the forward groups that run them: the adapters of one
    base share that base's single copy (and one forward), as does a full expert that is that base."""
    bases = [adapter_base(p) for p in paths]
    lora_groups: dict[Path, ForwardGroup] = {}
    models: list[nn.Module | None] = [None] * len(paths)
    for base in dict.fromkeys(b for b in bases if b is not None):
        members = [i for i, b in enumerate(bases) if b == base]
        group = LoRAGroup(load_model(base, device, dtype), [paths[i] for i in members], base)
        lora_groups[base] = ForwardGroup(group, {m: a for a, m in enumerate(members)})
        for a, m in enumerate(members):
            models[m] = AdapterExpert(group, a)
    groups = list(lora_groups.values())
    for i, path in enumerate(paths):
        if bases[i] is not None:
            continue
        group = lora_groups.get(path.resolve())
        if group is not None and -1 not in group.members.values():  # the base itself: no second copy
            models[i] = group.module.base
            group.members[i] = -1
        else:
            models[i] = load_model(path, device, dtype)
            groups.append(ForwardGroup(models[i], {i: -1}))
    return models, groups
