"""Load a Hugging Face checkpoint directory into our `CausalLM` (safetensors only) and its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .config import ModelConfig
from .model import PACKED_MODULES, CausalLM, MergedLinear

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed, stored by some old checkpoints


# Weights made in inference mode can never take the prepacked CPU path (engine/linear.py), and an engine
# built inside `torch.inference_mode()` (a benchmark, a server) would silently decode ~2x slower at B = 8.
@torch.inference_mode(False)
def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> CausalLM:
    """Our `CausalLM` with the weights of checkpoint directory `path`, in `dtype` on `device`, eval mode
    (ordinary tensors, also when called in inference mode)."""
    path = _checkpoint_dir(path)
    config = ModelConfig.from_pretrained(path)
    files = safetensors_files(path)
    model = CausalLM.empty(config, device, dtype)
    load_weights(model, files)
    return model.eval()


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer through transformers.AutoTokenizer, local files only."""
    from transformers import AutoTokenizer

    path = _checkpoint_dir(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards of its index, or model.safetensors."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            settings = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{index}: not valid JSON ({e})") from None
        weight_map = settings.get("weight_map") if isinstance(settings, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: expected a \"weight_map\" object of weight name -> shard file")
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path}: {INDEX_FILE} names shards that are not there: {', '.join(missing)}"
            )
        return [path / name for name in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{path}: only pickle weights ({', '.join(pickles)}); they are not loaded because unpickling "
            "runs arbitrary code. If you trust them, convert once to safetensors: python -c "
            '"from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{path}').save_pretrained('{path}', safe_serialization=True)\""
        )
    raise FileNotFoundError(f"{path}: no weights (expected {SINGLE_FILE} or {INDEX_FILE})")


def load_weights(model: CausalLM, files: list[Path]) -> None:
    """Copy every checkpoint tensor into its (possibly fused) parameter; any missing or unexpected name,
    or a shape mismatch, is a ValueError."""
    targets = checkpoint_targets(model)
    tied = model.lm_head is None
    unexpected, loaded, tied_head = [], set(), None
    with torch.no_grad():
        for file in files:
            try:
                f = safe_open(file, framework="pt", device="cpu")
            except SafetensorError as e:
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
            with f:
                for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    if name.endswith(IGNORED_SUFFIXES):
                        continue
                    if tied and name == "lm_head.weight":
                        tied_head = (file, f.get_tensor(name))
                        continue
                    target = targets.get(name)
                    if target is None:
                        unexpected.append(name)
                        continue
                    tensor = f.get_tensor(name)
                    if tensor.shape != target.shape:
                        raise ValueError(
                            f"{file.name}: weight {name} has shape {tuple(tensor.shape)}, "
                            f"the config implies {tuple(target.shape)}"
                        )
                    target.copy_(tensor)
                    loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the {model.config.architecture} config: "
            f"missing weights {_some(missing)}, unexpected weights {_some(unexpected)}"
        )
    # A tied checkpoint may store lm_head.weight too (a copy); one that differs is ambiguous: transformers 5
    # then leaves the two untied (its logits use lm_head.weight), transformers 4 ties them to the embedding
    embedding = model.model.embed_tokens.weight
    if tied_head is not None and not torch.equal(tied_head[1].to(embedding), embedding):
        raise ValueError(
            f"{tied_head[0].name}: tie_word_embeddings is true but lm_head.weight differs from "
            "model.embed_tokens.weight; set tie_word_embeddings to false in config.json if the checkpoint's "
            "lm_head is meant to be used"
        )


def checkpoint_targets(model: CausalLM) -> dict[str, Tensor]:
    """Checkpoint weight name -> the tensor (a parameter, or a row shard of a fused one) it loads into."""
    targets = {}
    for name, param in model.named_parameters():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if not isinstance(module, MergedLinear):
            targets[name] = param
            continue
        parent, _, fused = module_name.rpartition(".")
        for checkpoint_module, (fused_name, index) in PACKED_MODULES.items():
            if fused_name == fused:
                targets[f"{parent}.{checkpoint_module}.{attr}"] = module.shard(param, index)
    return targets


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    return path


def _some(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
