"""Shared setup of the mope trainer tests: three tiny experts, a registry mapping the six dimensions onto
them, a prompt file, and a small train config."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from mope.config import TrainConfig
from tests.helpers import make_tiny_checkpoint

# every dimension is served by one of three experts, so a composite preference activates 2 or 3
EXPERT_OF = {"P1A": 0, "P1B": 1, "P2A": 1, "P2B": 2, "P3A": 2, "P3B": 0}
TINY_PCM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1)
PROMPTS = ["Explain the sun.", "What is the capital of France?", "Write a function.", "Be friendly."]


def make_training_dir(root: Path) -> tuple[Path, list[str]]:
    experts = [str(make_tiny_checkpoint(root / f"expert{i}", seed=i)) for i in range(3)]
    data = json.loads(resources.files("mope").joinpath("data/preferences.json").read_text())
    for code, dim in data["dimensions"].items():
        dim["expert"] = EXPERT_OF[code]
    (root / "preferences.json").write_text(json.dumps(data))
    (root / "prompts.json").write_text(json.dumps([{"prompt": p, "gold": p.upper()} for p in PROMPTS]))
    return root, experts


def make_config(setup: tuple[Path, list[str]], out: Path, **overrides) -> TrainConfig:
    """Keyword rewards (one word per dimension), a fresh one-layer PCM, 3 steps of 2 pairs."""
    root, experts = setup
    rewards = {code: {"type": "keywords", "words": [w]} for code, w in
               zip(EXPERT_OF, ["the", "a", "e", "o", "s", "!"], strict=True)}
    settings = dict(experts=experts, prompts=str(root / "prompts.json"), rewards=rewards, output_dir=str(out),
                    preferences_file=str(root / "preferences.json"), pcm_backbone=TINY_PCM, steps=3,
                    batch_size=2, epochs=2, lr=1e-2, max_tokens=6, checkpoint_every=1, num_kv_blocks=96,
                    plot=False, progress=False, warmup_steps=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def params(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.pcm.state_dict().items()}
