"""The demo kit: tokenizer, base LM, six LoRA expert adapters and a PCM backbone, built once and cached.

The cache key is a hash of the recipe and of the source of the modules that build the kit, so a kit
is rebuilt only when it is missing or its recipe (or code) changes. A build runs in a temporary
directory that is renamed into place at the end: an interrupted build never leaves a half kit. The
experts' adapter_config.json name the base by its final absolute path (base_model_name_or_path), so a
kit directory works where it was built: moving it means rebuilding it.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from mope.demo import corpus, scorers, tokenizer, train_lm
from mope.demo.corpus import build_corpus, expert_prompt, pcm_prompt, split_instructions
from mope.demo.tokenizer import train_tokenizer
from mope.demo.train_lm import add_lora, encode, llama_config, save_adapter, save_checkpoint, train_causal_lm
from mope.preferences import default_registry

DEFAULT_CACHE = Path(os.environ.get("MOPE_DEMO_CACHE", Path.home() / ".cache" / "mope" / "demo"))
# Fixed, so that a kit is the same everywhere; 1 because these matrices are too small to split:
# measured on the shared 2-core machine, 2 threads were 5x slower per step than 1.
BUILD_THREADS = 1


@dataclass(frozen=True)
class KitRecipe:
    """Sizes, steps and seed of a kit; the defaults build in about 2-3 minutes on 2 CPU cores."""

    seed: int = 0
    variants: int = 2  # responses per (instruction, combination)
    held_out: int = 24  # instructions kept out of all training: the evaluation prompts
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    batch_size: int = 32
    base_steps: int = 300
    base_lr: float = 3e-3
    expert_steps: int = 120  # each expert: a LoRA adapter over the base LM
    expert_lr: float = 1e-2
    lora_rank: int = 8
    lora_alpha: int = 16
    pcm_hidden: int = 64
    pcm_layers: int = 2
    pcm_heads: int = 4
    pcm_steps: int = 150

    @classmethod
    def tiny(cls) -> "KitRecipe":
        """A fast variant for tests (under a minute on one core) whose experts still learn their styles."""
        return cls(hidden=96, layers=2, batch_size=16, base_steps=400, expert_steps=100, pcm_hidden=32,
                   pcm_layers=1, pcm_steps=60)

    def digest(self) -> str:
        """Hash of the recipe and of the code that turns it into a kit."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        for module in (corpus, scorers, tokenizer, train_lm):
            h.update(Path(module.__file__).read_bytes())
        h.update(Path(__file__).read_bytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class KitPaths:
    """Where the parts of a built kit are: ordinary HF checkpoints (base, PCM backbone) and PEFT LoRA
    adapter directories (experts)."""

    root: Path

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def experts(self) -> list[Path]:
        """One expert per dimension, in the registry's order (P1A, P1B, P2A, P2B, P3A, P3B): PEFT LoRA
        adapters over `base` (adapter_config.json, adapter_model.safetensors, tokenizer files)."""
        return [self.root / "experts" / f"{d.code}-{d.name}" for d in default_registry().dimensions]

    @property
    def pcm_backbone(self) -> Path:
        return self.root / "pcm_backbone"

    @property
    def train_prompts(self) -> Path:
        """JSON list of {"prompt": instruction} records the experts were trained on (REBEL's prompts)."""
        return self.root / "train_prompts.json"

    @property
    def eval_prompts(self) -> Path:
        """JSON list of {"prompt": instruction} records kept out of all training."""
        return self.root / "eval_prompts.json"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.json"


def build_kit(
    cache_dir: str | Path | None = None, recipe: KitRecipe | None = None, progress: bool = True
) -> KitPaths:
    """The kit of `recipe` under `cache_dir` (default: $MOPE_DEMO_CACHE or ~/.cache/mope/demo), built
    if it is missing."""
    recipe = recipe or KitRecipe()
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ValueError(f"cache_dir {cache_dir} exists and is not a directory")
    kit = KitPaths(cache_dir / f"kit-{recipe.digest()}")
    if kit.recipe.is_file():
        return kit
    cache_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        _build(KitPaths(building), kit.base.resolve(), recipe, progress)
        os.rename(building, kit.root)
    except OSError:
        if not kit.recipe.is_file():  # not a concurrent build that finished first
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return kit


def _build(kit: KitPaths, final_base: Path, recipe: KitRecipe, progress: bool) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        _train_all(kit, final_base, recipe, progress)
    finally:
        torch.set_num_threads(threads)


def _train_all(kit: KitPaths, final_base: Path, r: KitRecipe, progress: bool) -> None:
    """Build every part of the kit under `kit.root`; the experts name `final_base` as their base."""
    train, held_out = split_instructions(r.held_out, r.seed)
    examples = build_corpus(train, r.variants, r.seed)
    expert_pairs = [(expert_prompt(e.instruction), e.response) for e in examples]
    pcm_pairs = [(pcm_prompt(e.instruction, e.combination), e.response) for e in examples]
    tok = train_tokenizer([p + y for p, y in pcm_pairs], r.vocab_size, kit.tokenizer)
    fit = lambda model, data, steps, lr, name: train_causal_lm(
        model,
        data,
        steps=steps,
        batch_size=r.batch_size,
        lr=lr,
        seed=r.seed,
        pad_id=tok.pad_token_id,
        desc=name if progress else None,
    )

    torch.manual_seed(r.seed)
    base = LlamaForCausalLM(llama_config(tok, r.hidden, r.layers, r.heads))
    fit(base, encode(tok, expert_pairs, loss_on_prompt=True), r.base_steps, r.base_lr, "base LM")
    save_checkpoint(base, tok, kit.base)
    for dim, path in zip(default_registry().dimensions, kit.experts, strict=True):
        own = [
            (expert_prompt(e.instruction), e.response)
            for e in examples
            if dim.code in e.combination.split(",")
        ]
        expert = LlamaForCausalLM.from_pretrained(kit.base)
        torch.manual_seed(r.seed)
        lora = add_lora(expert, r.lora_rank, r.lora_alpha)
        fit(
            expert, encode(tok, own, loss_on_prompt=False), r.expert_steps, r.expert_lr, f"expert {path.name}"
        )
        save_adapter(expert, lora, tok, final_base, path)

    torch.manual_seed(r.seed)
    backbone = LlamaForCausalLM(llama_config(tok, r.pcm_hidden, r.pcm_layers, r.pcm_heads))
    fit(backbone, encode(tok, pcm_pairs, loss_on_prompt=True), r.pcm_steps, r.base_lr, "PCM backbone")
    save_checkpoint(backbone, tok, kit.pcm_backbone)

    kit.train_prompts.write_text(json.dumps([{"prompt": x} for x in train], indent=1))
    kit.eval_prompts.write_text(json.dumps([{"prompt": x} for x in held_out], indent=1))
    kit.recipe.write_text(json.dumps(asdict(r), indent=1))  # last: marks the kit complete
