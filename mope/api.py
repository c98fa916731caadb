"""``mope.Engine``: the engine with a PCM given as a directory, or uniform weights when there is none."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from mope.engine.context import AttentionContext
from mope.engine.engine import Engine as BaseEngine
from mope.engine.engine import check_device
from mope.pcm import PCM
from mope.preferences import Preference, PreferenceRegistry, default_registry


class UniformWeights:
    """Weight provider without a model: uniform over the preference's active experts ("MPD (Uniform)")."""

    model = None

    def __init__(self, experts: Sequence[str], registry: PreferenceRegistry | None = None):
        self.experts = [str(e) for e in experts]
        self.registry = registry or default_registry()

    def prepare(self, prompt: str, preference: str | Preference) -> tuple[list[int], list[bool]]:
        return [], self.registry.parse(preference).active_mask(self.experts)

    def weights(self, hidden: Tensor | None, active: Tensor) -> Tensor:
        active = active.float()
        return active / active.sum(-1, keepdim=True)


def check_pcm_experts(pcm: PCM, experts: list[str]) -> None:
    """The PCM weighs the experts it was trained with, in that order: refuse another count or order (a
    warning when the names are unknown to it, e.g. checkpoints that moved)."""
    if pcm.n_experts != len(experts):
        raise ValueError(f"the PCM weighs {pcm.n_experts} experts, but the engine has {len(experts)}")
    if pcm.expert_names is None:
        return
    # the same experts: the same paths, or (checkpoints that moved) the same distinct folder names
    for key in (os.path.realpath, lambda e: os.path.basename(os.path.normpath(e))):
        trained, given = [key(e) for e in pcm.expert_names], [key(e) for e in experts]
        if len(set(trained)) < len(trained):
            continue
        if trained == given:
            return
        if sorted(trained) == sorted(given):
            raise ValueError(f"the PCM was trained with the experts in the order {pcm.expert_names}; pass "
                             f"them in that order (got {experts})")
    warnings.warn(f"the PCM was trained with experts {pcm.expert_names}, not {experts}: its weight k goes to "
                  "the k-th expert given here", stacklevel=3)


class Engine(BaseEngine):
    """``mope.engine.Engine`` whose ``pcm`` may be a saved PCM directory, a ``PCM`` (or any weight
    provider), or None: then ``preferences`` get uniform weights over their active experts."""

    def __init__(self, experts: list[str | os.PathLike], pcm=None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, registry: PreferenceRegistry | None = None, **kwargs):
        device = check_device(device)
        if isinstance(pcm, str | os.PathLike):
            pcm = PCM.load(pcm, device, dtype)
        if isinstance(pcm, PCM):
            check_pcm_experts(pcm, [str(e) for e in experts])
            if pcm.expert_names is None:
                pcm.expert_names = [str(e) for e in experts]
        self.registry = registry or getattr(pcm, "registry", None) or default_registry()
        provider = pcm if pcm is not None else UniformWeights(experts, self.registry)
        super().__init__(experts, pcm=provider, device=device, dtype=dtype, **kwargs)

    def format_prompts(self, instructions: Sequence[str], preferences: Sequence | None = None) -> list[str]:
        """Instructions in the registry's prompt format (with the preference prompts when given)."""
        if preferences is None:
            return [self.registry.format_prompt(i) for i in instructions]
        prefs = [self.registry.parse(p) for p in preferences]
        return [self.registry.format_prompt(i, p) for i, p in zip(instructions, prefs, strict=True)]

    def forget_provider_cache(self) -> None:
        """Drop the weight provider's blocks from the prefix cache (after a PCM update they are stale)."""
        if self.provider.model is not None:  # uniform weights have no model and no blocks
            self.reset_prefix_cache(self.num_experts)

    @torch.inference_mode()
    def expert_logits(self, prompts: list[str], response_ids: list[list[int]]) -> Tensor:
        """Teacher-forced fp32 logits (K, sum of response lengths, V) of every expert at each response
        token (what the logit-mode trainer needs for ``mix_logprobs``)."""
        prompt_ids, _ = self._encode(prompts)
        ids, positions, bounds, predictors = [], [], [0], []
        for prompt, response in zip(prompt_ids, response_ids, strict=True):
            seq = prompt + list(response[:-1])
            first = bounds[-1] + len(prompt) - 1
            predictors += range(first, first + len(response))
            ids += seq
            positions += range(len(seq))
            bounds.append(bounds[-1] + len(seq))
        ctx = AttentionContext(is_prefill=True, cu_seqlens_q=torch.tensor(bounds, dtype=torch.int32,
                                                                         device=self.device))
        ids_t, pos_t = torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device)
        rows = torch.tensor(predictors, dtype=torch.int64, device=self.device)
        return torch.stack([model.compute_logits(model(ids_t, pos_t, ctx, None).index_select(0, rows))
                            for model in self.runner.models[: self.num_experts]])
