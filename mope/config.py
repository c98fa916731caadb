"""The REBEL training configuration: a dataclass loaded from YAML or JSON."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

INT_KEYS = ("steps", "batch_size", "epochs", "minibatch_size", "warmup_steps", "top_k", "max_tokens", "seed",
            "checkpoint_every", "block_size", "num_kv_blocks")
FLOAT_KEYS = ("lr", "weight_decay", "grad_clip", "eta", "temperature", "top_p")
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass
class TrainConfig:
    """Everything a training run needs; ``mope train --config cfg.yaml`` reads these keys."""

    experts: list[str]  # expert checkpoint directories (K)
    prompts: str  # JSON file: a list of {"prompt": ..., [reference field]} (or of strings)
    rewards: dict[str, dict]  # dimension code -> reward spec ({"type": "hf", "path": ...}, ...)
    output_dir: str
    pcm: str | None = None  # start from: a saved PCM, a HF backbone checkpoint or a LoRA adapter of one
    pcm_backbone: dict | None = None  # or a fresh Llama: config overrides (hidden_size, ...), tokenizer
    preferences: list[str] | None = None  # None: every combination of the registry (8 by default)
    preferences_file: str | None = None  # a preferences.json of your own dimensions (default: packaged)
    reference: str = "uniform"  # "uniform" (greedy, uniform weights, cached) or "field:<name>"
    steps: int = 100
    batch_size: int = 8  # (prompt, preference) pairs per step, two responses each
    epochs: int = 2  # optimiser epochs over each step's batch
    minibatch_size: int | None = None  # pairs per optimiser step; None: the whole batch
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (after warm-up), per optimiser step
    eta: float = 1.0
    mix_mode: str = "prob"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    seed: int = 0
    checkpoint_every: int = 10
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_kv_blocks: int | None = None
    plot: bool = True
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes kept with the run

    def __post_init__(self) -> None:
        for key in INT_KEYS + FLOAT_KEYS:
            value = getattr(self, key)
            if not (value is None and key in ("minibatch_size", "num_kv_blocks")):  # None: optional
                setattr(self, key, _number(key, value, int if key in INT_KEYS else float))
        checks = [
            (isinstance(self.experts, list) and len(self.experts) > 0, "experts must be a non-empty list"),
            (isinstance(self.rewards, dict) and bool(self.rewards), "rewards must map dimensions to specs"),
            (self.preferences is None or (isinstance(self.preferences, list) and len(self.preferences) > 0
                                          and all(isinstance(p, str) for p in self.preferences)),
             f"preferences must be a non-empty list of strings like 'P1A,P2B', got {self.preferences!r}"),
            (self.pcm is None or self.pcm_backbone is None, "give pcm or pcm_backbone, not both"),
            (self.reference == "uniform" or self.reference.startswith("field:"),
             f"reference must be 'uniform' or 'field:<name>', got {self.reference!r}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.minibatch_size is None or 1 <= self.minibatch_size <= self.batch_size,
             f"minibatch_size must be in [1, batch_size], got {self.minibatch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.schedule in ("cosine", "linear", "constant"),
             f"schedule must be cosine, linear or constant, got {self.schedule!r}"),
            (self.eta > 0, f"eta must be > 0, got {self.eta}"),
            (self.mix_mode in ("prob", "logit"), f"mix_mode must be 'prob' or 'logit': {self.mix_mode!r}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.dtype in ("float32", "bfloat16", "float16"),
             f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}"),
            (isinstance(self.device, str) and DEVICE.fullmatch(self.device) is not None,
             f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}"),
            (isinstance(self.plot, bool), f"plot must be true or false, got {self.plot!r}"),
            (isinstance(self.progress, bool), f"progress must be true or false, got {self.progress!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"train config: {message}")
        from mope.engine.sampling_params import SamplingParams  # (imports torch: not at module level)

        try:  # the rollouts' sampling settings, checked now rather than at the first step
            SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                           max_tokens=self.max_tokens, seed=self.seed)
        except ValueError as e:
            raise ValueError(f"train config: {str(e).removeprefix('SamplingParams.')}") from None

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        if not isinstance(data, dict):
            raise ValueError(f"train config must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"train config: unknown keys {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(names))}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                         and f.name not in data)
        if missing:
            raise ValueError(f"train config: missing required keys {', '.join(missing)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a .yaml/.yml or .json file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"config file {path} is not valid {path.suffix[1:] or 'YAML'}: {e}") from e
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _number(key: str, value, kind: type) -> int | float:
    """``value`` as an int or float; numeric strings are converted (YAML reads ``1e-5`` as a string)."""
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    elif not isinstance(value, bool) and isinstance(value, int | float if kind is float else int):
        return kind(value)
    raise ValueError(f"train config: {key} must be {'an integer' if kind is int else 'a number'}, "
                     f"got {value!r}")
