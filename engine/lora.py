"""PEFT LoRA adapters as experts over one shared base `CausalLM` (Punica / S-LoRA style).

One base forward serves the rows of every adapter expert together; each projection then adds each
adapter's low-rank delta on that adapter's own rows (`LoRALinear`: on CPU folded into the base GEMM,
on CUDA `mope.kernels.lora`'s segmented kernels). The fused q/k/v and gate/up projections of `CausalLM`
take each shard's delta in its slice of the output. The base model is not copied, and a row with
adapter index -1 is the plain base.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mope.kernels import packed_linear
from mope.kernels.lora import BACKENDS, LoRARows, add_lora
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .context import AttentionContext
from .linear import kept_projection, packed_weight, rows_take_packed_path
from .model import PACKED_MODULES, CausalLM

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# adapter_config.json fields that change what the adapter computes and that we do not implement
UNSUPPORTED_FIELDS = {
    "modules_to_save": "modules_to_save (fully trained copies of base modules)",
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "lora_bias",
    "fan_in_fan_out": "fan_in_fan_out",
    "rank_pattern": "rank_pattern (per-module ranks)",
    "alpha_pattern": "alpha_pattern (per-module alphas)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "kasa_config": "kasa_config",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
}
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig's lora_alpha when adapter_config.json has none
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)"
                  r"\.lora_([AB])\.weight$")


@dataclass
class LoRAAdapter:
    """One adapter: (layer, checkpoint module) -> (A (r, in), B (out, r) with the scaling folded in)."""

    path: Path
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[Tensor, Tensor]] = field(repr=False)


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json of `path`, checked: a plain LoRA with no feature we do not implement (a missing
    lora_alpha filled in with peft's default)."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (expected a PEFT LoRA adapter directory)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config['peft_type']!r} is not supported (only LORA)")
    for name, feature in UNSUPPORTED_FIELDS.items():
        if config.get(name):
            raise ValueError(f"{path}: adapter uses {feature}, which is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: adapter bias={config['bias']!r} is not supported (only 'none')")
    targets = config.get("target_modules")
    if isinstance(targets, list | tuple):
        unknown = sorted(set(targets) - set(TARGET_MODULES))
        if unknown:
            raise ValueError(f"{path}: target_modules {unknown} are not supported "
                             f"(supported: {', '.join(TARGET_MODULES)})")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{path}: r must be a positive int, got {rank!r}")
    alpha = config.setdefault("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    return config


def check_same_base(path: Path, config: dict, base_path: str | Path | None) -> None:
    """ValueError when the adapter's base_model_name_or_path is a local checkpoint other than `base_path`.

    Checkable only when both are local directories; a copy of the base (same config.json and the same
    safetensors contents) counts as the same base.
    """
    named = config.get("base_model_name_or_path")
    if base_path is None or not named or not Path(named).is_dir():
        return
    if Path(named).resolve() != Path(base_path).resolve() and _fingerprint(named) != _fingerprint(base_path):
        raise ValueError(f"{path}: adapter was trained on base_model_name_or_path={named!r}, "
                         f"not on the engine's base {str(base_path)!r}")


def _fingerprint(checkpoint: str | Path) -> tuple:
    """config.json (less its own path) and a digest of each safetensors file."""
    checkpoint = Path(checkpoint).resolve()
    config = checkpoint / "config.json"
    settings = json.loads(config.read_text()) if config.is_file() else {}
    settings.pop("_name_or_path", None)
    files = sorted(checkpoint.glob("*.safetensors"))
    return json.dumps(settings, sort_keys=True), [(f.name, _digest(f, f.stat().st_mtime_ns)) for f in files]


@functools.cache
def _digest(file: Path, mtime_ns: int) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def load_adapter(path: str | Path, base_path: str | Path | None = None) -> LoRAAdapter:
    """Read a PEFT LoRA adapter directory (fp32, CPU). `base_path`: the base checkpoint, to check against."""
    path = Path(path)
    config = read_adapter_config(path)
    check_same_base(path, config, base_path)
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} (pickle adapter weights are not loaded)")
    rank, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except SafetensorError as e:
        raise ValueError(f"{path / WEIGHTS_FILE}: not a readable safetensors file ({e})") from None
    pairs: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None or match[2] not in TARGET_MODULES:
            raise ValueError(f"{path}: weight {key!r} is not a LoRA factor of a supported target module "
                             f"({', '.join(TARGET_MODULES)})")
        pairs.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor.float()
    if not pairs:
        raise ValueError(f"{path}: {WEIGHTS_FILE} holds no LoRA weights")
    weights = {}
    for (layer, module), factors in pairs.items():
        if set(factors) != {"A", "B"}:
            raise ValueError(f"{path}: layer {layer} {module} lacks lora_{'B' if 'A' in factors else 'A'}")
        a, b = factors["A"], factors["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{path}: layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)} are not (r, in) and (out, r)")
        if a.shape[0] != rank:
            raise ValueError(f"{path}: layer {layer} {module}: lora_A/lora_B have rank {a.shape[0]}, "
                             f"but {CONFIG_FILE} says r={rank}")
        weights[(layer, module)] = (a, b * scaling)
    return LoRAAdapter(path=path, rank=rank, scaling=scaling, weights=weights)


# our fused module -> the checkpoint modules of its output shards, in order
FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
assert all(PACKED_MODULES[m] == (fused, i) for fused, shards in FUSED_SHARDS.items() if len(shards) > 1
           for i, m in enumerate(shards))


@dataclass
class StackedLoRA:
    """Every adapter's factors for one of our (possibly fused) linear layers.

    a (L, S*r, in): shard s of adapter l in rows s*r .. s*r + r_l (zeros pad smaller ranks and shards the
    adapter does not target); b (L, out, S*r): block-diagonal, shard s's output rows read its r columns.
    """

    a: Tensor
    b: Tensor


def stack_adapters(linear: nn.Linear, shards: tuple[str, ...], layer: int,
                   adapters: list[LoRAAdapter]) -> StackedLoRA | None:
    """The StackedLoRA of `linear` (layer `layer`), None when no adapter targets it."""
    sizes = getattr(linear, "shard_sizes", [linear.out_features])
    factors = [[adapter.weights.get((layer, m)) for m in shards] for adapter in adapters]
    ranks = [f[0].shape[0] for per_adapter in factors for f in per_adapter if f is not None]
    if not ranks:
        return None
    rank, width = max(ranks), len(shards) * max(ranks)
    a = torch.zeros(len(adapters), width, linear.in_features)
    b = torch.zeros(len(adapters), linear.out_features, width)
    for l, per_adapter in enumerate(factors):
        row = 0
        for s, (module, size, pair) in enumerate(zip(shards, sizes, per_adapter, strict=True)):
            if pair is not None:
                lora_a, lora_b = pair
                if lora_a.shape[1] != linear.in_features or lora_b.shape[0] != size:
                    raise ValueError(
                        f"{adapters[l].path}: layer {layer} {module} factors {tuple(lora_a.shape)}, "
                        f"{tuple(lora_b.shape)} do not fit the base's ({size}, {linear.in_features}) weight")
                r = lora_a.shape[0]
                a[l, s * rank: s * rank + r] = lora_a
                b[l, row: row + size, s * rank: s * rank + r] = lora_b
            row += size
    weight = linear.weight
    return StackedLoRA(a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype))


def projection(model: CausalLM, layer: int, fused: str) -> nn.Module:
    """Our (possibly fused) linear layer `fused` of decoder layer `layer`."""
    return getattr(_projection_parent(model, layer, fused), fused)


def set_projection(model: CausalLM, layer: int, fused: str, module: nn.Module) -> None:
    setattr(_projection_parent(model, layer, fused), fused, module)


def _projection_parent(model: CausalLM, layer: int, fused: str) -> nn.Module:
    block = model.model.layers[layer]
    return block.self_attn if fused in ("qkv_proj", "o_proj") else block.mlp


class StepRows:
    """The step being run, shared by a group's projections: each row's adapter (None: no step), and whether
    they take the packed CPU path. That is decided once per step (every projection of a step sees the same
    rows, dtype and device): per call, the checks cost ~10 us in a decode step, whose GEMMs had just
    evicted Python's objects from the caches (bench/README.md, LoRA experts)."""

    rows: LoRARows | None = None
    packed: bool = False


class LoRALinear(nn.Module):
    """A base projection of a LoRAGroup: the base output of every row plus its own adapter's delta.

    On CPU, for steps of up to 256 rows (decode, short prefills), the adapters' A factors are folded into
    the base weight and one call of `packed_linear.packed_lora_linear` does the base GEMM, every shrink
    and each row's own expand: the step reads the base and each factor once (bench/README.md, LoRA
    experts). The base weight becomes a view into the folded one, so nothing is stored twice. Otherwise
    (CUDA, larger prefills, the "torch"/"triton" backends) it is the base layer plus `add_lora`.
    """

    @torch.inference_mode(False)  # inference tensors could never take the packed path
    def __init__(self, base_layer: nn.Linear, lora: StackedLoRA, step: StepRows, backend: str):
        super().__init__()
        self.base_layer, self.lora, self.step, self.backend = base_layer, lora, step, backend
        weight = base_layer.weight
        self.folded_weight = torch.cat([weight.detach(), lora.a.reshape(-1, weight.shape[1])])
        weight.data = self.folded_weight[: weight.shape[0]]  # shares storage and version counter
        # (bias, packed expand) for the packed path, made on its first use (CPU only; kept to spare the
        # module lookups a call, bench/README.md)
        self._packed: tuple[Tensor | None, packed_linear.PackedExpand] | None = None

    def forward(self, x: Tensor) -> Tensor:
        step = self.step
        if step.rows is None:
            return self.base_layer(x)
        if not step.packed:
            return add_lora(self.base_layer(x), x, self.lora.a, self.lora.b, step.rows, backend=self.backend)
        bias, expand = self._packed_expand()
        return packed_linear.packed_lora_linear(x, packed_weight(self.folded_weight), bias,
                                                step.rows.adapter_index, expand)

    def decode_projection(self, x: Tensor):
        """This layer for `decode_layers` when its forward would run the packed kernels on x, else None."""
        step = self.step
        if step.rows is None:
            return self.base_layer.decode_projection(x)
        if not step.packed:
            return None
        return kept_projection(self, self.folded_weight, *self._packed_expand())

    def _packed_expand(self) -> tuple[Tensor | None, packed_linear.PackedExpand]:
        if self._packed is None:  # the expand: [B_0 .. B_{L-1}] side by side, (out, L * width)
            num_adapters, out_features, width = self.lora.b.shape
            expand = self.lora.b.permute(1, 0, 2).reshape(out_features, num_adapters * width)
            self._packed = (self.base_layer.bias, packed_linear.pack_lora_expand(expand, num_adapters))
        return self._packed


def stack_all(model: CausalLM, adapters: list[LoRAAdapter]) -> dict[tuple[int, str], StackedLoRA]:
    """The StackedLoRA of every (layer, fused projection) of `model` that an adapter targets."""
    num_layers = len(model.model.layers)
    for adapter in adapters:
        deep = [layer for layer, _ in adapter.weights if layer >= num_layers]
        if deep:
            raise ValueError(f"{adapter.path}: adapter has layer {max(deep)}; the base has {num_layers}")
    stacks = {}
    for layer in range(num_layers):
        for fused, shards in FUSED_SHARDS.items():
            stacked = stack_adapters(projection(model, layer, fused), shards, layer, adapters)
            if stacked is not None:
                stacks[(layer, fused)] = stacked
    return stacks


@torch.no_grad()
def add_merged(model: CausalLM, stacks: dict[tuple[int, str], StackedLoRA], mix: list[float]) -> None:
    """Add sum_l mix[l] * B_l A_l of every stack into `model`'s weights (its LoRALinears' base layers)."""
    for (layer, fused), lora in stacks.items():
        coefficients = torch.tensor(mix, dtype=lora.b.dtype, device=lora.b.device)[:, None, None]
        linear = projection(model, layer, fused)  # in a LoRAGroup's own base: its LoRALinear's base layer
        weight = getattr(linear, "base_layer", linear).weight
        weight += ((lora.b * coefficients) @ lora.a).sum(0).to(weight.device, weight.dtype)


def merge_adapter(model: CausalLM, path: str | Path, base_path: str | Path | None = None) -> None:
    """Add the adapter at `path` into `model`'s weights, W += B A scaled (peft's merge_and_unload): `model`
    then is the adapted model (a PCM backbone given as an adapter, say)."""
    add_merged(model, stack_all(model, [load_adapter(path, base_path)]), [1.0])


class LoRAGroup(nn.Module):
    """One base `CausalLM` and L LoRA adapters served as L + 1 experts of one architecture.

    `forward(..., adapter_index)` runs the base once over all rows; row n also gets the delta of
    adapter `adapter_index[n]` (-1: the plain base). Each adapter expert keeps its own KV blocks:
    give its sequences their own block tables / slots in `ctx`, as for any other expert. The targeted
    projections of the base are replaced by `LoRALinear`s until `remove()`.
    backend: "auto" (the folded GEMMs on CPU, Triton on CUDA), "torch" (add_lora's reference) or "triton".
    """

    def __init__(self, base: CausalLM, adapters: list[str | Path], base_path: str | Path | None = None,
                 backend: str = "auto"):
        super().__init__()
        if not adapters:
            raise ValueError("adapters must name at least one adapter directory")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.base = base
        self.adapters = [load_adapter(p, base_path) for p in adapters]
        self.step, self.backend = StepRows(), backend
        base.lora_step = self.step
        self.stacks = stack_all(base, self.adapters)
        for (i, fused), stacked in self.stacks.items():
            linear = LoRALinear(projection(base, i, fused), stacked, self.step, backend)
            set_projection(base, i, fused, linear)
        # one projection's folded weight: all have the base's dtype and device (for `takes_packed_path`)
        projections = (m for m in base.modules() if isinstance(m, LoRALinear))
        self._folded_weight = next((m.folded_weight for m in projections), None)

    @property
    def num_adapters(self) -> int:
        return len(self.adapters)

    @property
    def config(self):
        """The base's ModelConfig: every adapter expert has the base's shape (and KV layout)."""
        return self.base.config

    def forward(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext,
                kv_cache: list[tuple[Tensor, Tensor]] | None, adapter_index: Tensor) -> Tensor:
        """As `CausalLM.forward`; `adapter_index` (N,) int64 in [-1, L): each token's adapter (-1: none)."""
        self._set_step(input_ids, adapter_index)
        try:
            return self.base(input_ids, positions, ctx, kv_cache)
        finally:
            self.step.rows = None

    def _set_step(self, input_ids: Tensor, adapter_index: Tensor) -> None:
        if adapter_index.shape != input_ids.shape:
            raise ValueError(f"adapter_index must be (N,) like input_ids, got {tuple(adapter_index.shape)}")
        self.step.rows = LoRARows.from_index(adapter_index.to(input_ids.device), len(self.adapters))
        self.step.packed = self.takes_packed_path(len(input_ids), input_ids.device)

    def decode_call(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext,
                    kv_cache: list[tuple[Tensor, Tensor]] | None, adapter_index: Tensor):
        """`forward` as a call for `decode_layers` (see `CausalLM.decode_call`), or None."""
        if self._forward_hooks or self._forward_pre_hooks:
            return None
        self._set_step(input_ids, adapter_index)
        try:
            return self.base.decode_call(input_ids, positions, ctx, kv_cache)
        finally:
            self.step.rows = None

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.base.compute_logits(hidden)

    def takes_packed_path(self, rows: int, device: torch.device) -> bool:
        """Whether a step of `rows` tokens on `device` runs every projection by `packed_lora_linear` (CPU)."""
        folded = self._folded_weight
        return (self.backend == "auto" and folded is not None and packed_linear.available()
                and rows_take_packed_path(rows, device, folded.dtype, folded))

    def merge_into(self, model: CausalLM, mix: list[float]) -> None:
        """Add sum_l mix[l] * B_l A_l into `model`'s weights (a model of the base's shape): with a one-hot
        `mix` the adapter merged into the base, with uniform `mix` the Personalized Soups average."""
        if len(mix) != len(self.adapters):
            raise ValueError(f"mix must hold one coefficient per adapter ({len(self.adapters)}), "
                             f"got {len(mix)}")
        add_merged(model, self.stacks, mix)

    def remove(self) -> None:
        """Detach the adapters: the base model computes the plain base again."""
        self.base.lora_step = None
        for layer, fused in self.stacks:
            module = projection(self.base, layer, fused)
            if isinstance(module, LoRALinear):
                set_projection(self.base, layer, fused, module.base_layer)
