"""The Preference Control Model: a small causal LM + a linear head hidden -> n_experts.

It reads "instruction + preference prompts + response so far" (the registry's prompt format) and gives
alpha_t, a softmax over the request's active experts (the others exactly 0). It is the engine's weight
provider (``model``, ``prepare``, ``weights``) and, teacher-forced with gradients, what REBEL trains.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mope.checkpoint import atomic_directory
from mope.engine.config import ModelConfig
from mope.engine.context import AttentionContext
from mope.engine.experts import adapter_base, tokenizer_dir
from mope.engine.loader import checkpoint_targets, load_model, load_tokenizer
from mope.engine.lora import merge_adapter
from mope.engine.model import CausalLM
from mope.preferences import Dimension, Preference, PreferenceRegistry, default_registry

HEAD_FILE = "head.safetensors"
SETTINGS_FILE = "pcm.json"
FRESH_BACKBONE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=2048)


class PCM(nn.Module):
    """Backbone ``model`` (our CausalLM) + ``head``; build with ``from_backbone``, ``fresh`` or ``load``."""

    def __init__(self, model: CausalLM, hf_config, tokenizer, n_experts: int,
                 registry: PreferenceRegistry | None = None, expert_names: Sequence[str] | None = None):
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        self.model = model
        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.registry = registry or default_registry()
        self.expert_names = list(expert_names) if expert_names is not None else None
        param = next(model.parameters())
        self.head = nn.Linear(model.config.hidden_size, n_experts, device=param.device, dtype=param.dtype)
        if model.lm_head is not None:  # the PCM reads hidden states only: its LM head is never used
            model.lm_head.requires_grad_(False)

    @property
    def n_experts(self) -> int:
        return self.head.out_features

    @classmethod
    def from_backbone(cls, path: str | Path, n_experts: int, device: str = "cpu",
                      dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs) -> PCM:
        """A pretrained HF checkpoint directory, or a PEFT LoRA adapter of one (merged into its base), as
        backbone, and a fresh head (seeded)."""
        from transformers import AutoConfig

        path = Path(path)
        base = adapter_base(path)  # None unless `path` is an adapter directory
        model = load_model(base or path, device, dtype)
        if base is not None:
            merge_adapter(model, path, base)
        hf_config = AutoConfig.from_pretrained(base or path, local_files_only=True)
        torch.manual_seed(seed)
        return cls(model, hf_config, load_tokenizer(tokenizer_dir(path, base)), n_experts, **kwargs)

    @classmethod
    def fresh(cls, tokenizer_path: str | Path, n_experts: int, device: str = "cpu",
              dtype: torch.dtype = torch.float32, seed: int = 0, registry: PreferenceRegistry | None = None,
              expert_names: Sequence[str] | None = None, **llama_overrides) -> PCM:
        """A randomly initialised Llama backbone (FRESH_BACKBONE, overridable) with the tokenizer (and the
        vocab_size) of ``tokenizer_path``, typically an expert's directory."""
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = load_tokenizer(tokenizer_path)
        # the experts' vocab_size (their embeddings may be padded past the tokenizer's size)
        has_config = (Path(tokenizer_path) / "config.json").is_file()
        vocab = ModelConfig.from_pretrained(tokenizer_path).vocab_size if has_config else len(tokenizer)
        settings = dict(FRESH_BACKBONE, architectures=["LlamaForCausalLM"], vocab_size=vocab,
                        bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        hf_config = LlamaConfig(**{**settings, **llama_overrides})
        torch.manual_seed(seed)
        reference = LlamaForCausalLM(hf_config)
        model = CausalLM.empty(ModelConfig.from_hf(hf_config), device, dtype)
        with torch.no_grad():
            hf_weights = reference.state_dict()
            for name, target in checkpoint_targets(model).items():
                target.copy_(hf_weights[name])
        return cls(model.eval(), hf_config, tokenizer, n_experts, registry, expert_names)

    # -- the engine's weight-provider hook -------------------------------------------------------
    def prepare(self, prompt: str, preference: str | Preference) -> tuple[list[int], list[bool]]:
        """Token ids the PCM reads for a request (its prompt, in the expert format or plain), and the
        preference's active-expert mask (K,)."""
        pref = self.registry.parse(preference)
        text = self.registry.format_prompt(self.registry.instruction_of(prompt), pref)
        experts = self.expert_names if self.expert_names is not None else self.n_experts
        return self.tokenizer(text).input_ids, pref.active_mask(experts)

    def weights(self, hidden: Tensor | None, active: Tensor) -> Tensor:
        """(B, hidden), (B, K) bool -> (B, K) fp32 weights, exactly 0 where not active."""
        return self.log_weights(hidden, active).exp()

    def log_weights(self, hidden: Tensor, active: Tensor) -> Tensor:
        """log alpha: a log-softmax over the active experts, -inf elsewhere."""
        if hidden is None or hidden.dim() != 2 or active.shape != (hidden.shape[0], self.n_experts):
            raise ValueError(f"hidden must be (B, hidden) and active (B, {self.n_experts}), got "
                             f"{None if hidden is None else tuple(hidden.shape)} and {tuple(active.shape)}")
        active = active.to(device=hidden.device, dtype=torch.bool)
        if not active.any(-1).all():
            raise ValueError("active: every row needs at least one active expert")
        logits = self.head(hidden).float()
        return logits.masked_fill(~active, float("-inf")).log_softmax(-1)

    # -- teacher-forced training forward ---------------------------------------------------------
    def forward(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                active: Tensor) -> Tensor:
        """log alpha at every response token of every sequence, in one prefill without a KV cache:
        (S prompts, S responses, (S, K) bool) -> (sum of response lengths, K)."""
        if not len(prompt_ids) == len(response_ids) == active.shape[0]:
            raise ValueError("prompt_ids, response_ids and active must have one length")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("prompt_ids: every PCM prompt needs at least one token")
        device = self.head.weight.device
        # sequence s reads its prompt and all but the last response token; the state after reading
        # prompt + response[:t] gives alpha_t. Sequences with an empty response are left out.
        kept = [i for i, r in enumerate(response_ids) if len(r)]
        if not kept:
            return torch.zeros(0, self.n_experts, device=device)
        seqs = [[*prompt_ids[i], *response_ids[i][:-1]] for i in kept]
        lens = torch.tensor([len(seq) for seq in seqs], dtype=torch.int32)
        bounds = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0, dtype=torch.int32)])
        starts = bounds[:-1]
        ctx = AttentionContext(is_prefill=True, cu_seqlens_q=bounds.to(device), context_lens=lens.to(device))
        input_ids = torch.tensor([t for seq in seqs for t in seq], device=device)
        positions = torch.cat([torch.arange(len(seq)) for seq in seqs]).to(device)
        hidden = self.model(input_ids, positions, ctx, None)
        rows = torch.cat([torch.arange(len(response_ids[i])) + starts[j] + len(prompt_ids[i]) - 1
                          for j, i in enumerate(kept)]).to(device)
        lengths = torch.tensor([len(response_ids[i]) for i in kept], device=device)
        return self.log_weights(hidden[rows], active.to(device)[kept].repeat_interleave(lengths, 0))

    def forward_weights(self, pcm_prompt_ids: Sequence[int], response_ids: Sequence[int],
                        active: Sequence[bool] | Tensor) -> Tensor:
        """alpha_t at each response position of one sequence: (T, K)."""
        mask = torch.as_tensor(active, dtype=torch.bool).view(1, -1)
        return self(([*pcm_prompt_ids],), ([*response_ids],), mask).exp()

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write config.json + model.safetensors + tokenizer + head.safetensors + pcm.json, atomically;
        ``path`` must be new, empty or a saved PCM (which is replaced)."""
        with atomic_directory(path, SETTINGS_FILE) as tmp:
            self.hf_config.save_pretrained(tmp)
            save_file(_cpu_copies(checkpoint_targets(self.model)), tmp / "model.safetensors")
            self.tokenizer.save_pretrained(tmp)
            save_file(_cpu_copies(self.head.state_dict()), tmp / HEAD_FILE)
            settings = {
                "n_experts": self.n_experts,
                "expert_names": self.expert_names,
                "prompt_format": self.registry.prompt_format,
                "dimensions": [vars(d) for d in self.registry.dimensions],
            }
            (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> PCM:
        """A PCM saved with ``save``."""
        path = Path(path)
        if not (path / SETTINGS_FILE).is_file() or not (path / HEAD_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a saved PCM (expected {SETTINGS_FILE} and {HEAD_FILE})")
        settings = json.loads((path / SETTINGS_FILE).read_text())
        dims = [Dimension(**d) for d in settings["dimensions"]]
        registry = PreferenceRegistry(dims, settings["prompt_format"])
        pcm = cls.from_backbone(path, settings["n_experts"], device, dtype, registry=registry,
                                expert_names=settings["expert_names"])
        pcm.head.load_state_dict(load_file(path / HEAD_FILE, device=str(device)))
        return pcm


def _cpu_copies(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Standalone contiguous CPU copies (fused-weight shards are views; safetensors wants owners)."""
    return {name: t.detach().cpu().clone() for name, t in tensors.items()}
