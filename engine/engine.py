"""`Engine`: K expert LLMs (and a weight provider's model) decoding in batched steps over one KV pool."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from mope.engine.block_manager import BlockManager
from mope.engine.config import ModelConfig
from mope.engine.experts import ForwardGroup, expert_config_and_tokenizer, load_experts
from mope.engine.kv_pool import KVPool, block_numel
from mope.engine.model_runner import ModelRunner
from mope.engine.sampling_params import SamplingParams
from mope.engine.scheduler import Scheduler
from mope.engine.sequence import Sequence, Track
from mope.engine.weight_provider import WeightProvider, check_simplex
from torch import Tensor
from tqdm.auto import tqdm

# default KV pool budget: this fraction of free memory (GPU) or of available memory (CPU, capped)
KV_MEMORY_FRACTION = {"cuda": 0.5, "cpu": 0.25}
KV_MEMORY_CAP_CPU = 4 << 30


@dataclass
class Output:
    """One generated response. Per token t: `logprobs[t]` = log π(token) of the untruncated tempered
    mixture, `expert_logprobs[t, k]` = log p_k(token) (-inf for inactive experts), `weights[t]` = the
    mixture weights used. `provider_prompt_ids` is what the weight provider's model read (empty without one).
    """

    token_ids: list[int]
    text: str
    logprobs: Tensor
    expert_logprobs: Tensor
    weights: Tensor
    finish_reason: str
    prompt_token_ids: list[int]
    provider_prompt_ids: list[int]


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device: the CPU, or a CUDA GPU that this torch build can use."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}") from e
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch build sees no CUDA GPU (torch {torch.__version__})")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s)")
    return parsed


class Engine:
    """Serve a mixture of `experts` sharing one tokenizer: Hugging Face checkpoint directories, or PEFT LoRA
    adapter directories over a local base (the adapters of one base run as one base forward).

    `pcm` is a WeightProvider that decides weights for requests given by preference. The KV pool holds
    `num_kv_blocks` blocks, or as many as `kv_cache_memory` bytes hold (default: a fraction of free memory,
    capped, and no more than `max_num_seqs` sequences of full context could use).
    """

    def __init__(self, experts: list[str | os.PathLike], pcm: WeightProvider | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_memory: int | None = None, mix_mode: str = "prob",
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 8192):
        if isinstance(experts, str | os.PathLike) or not experts:
            raise ValueError(f"experts must be a non-empty list of checkpoint directories, got {experts!r}")
        if mix_mode not in ("prob", "logit"):
            raise ValueError(f"mix_mode must be 'prob' or 'logit', got {mix_mode!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.float32, bfloat16 or float16, got {dtype!r}")
        limits = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens}
        for name, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.expert_paths = [Path(p) for p in experts]
        self.num_experts = len(experts)
        self.provider = pcm
        self.device = check_device(device)
        self.block_size = block_size
        configs, tokenizers = [], []
        for path in self.expert_paths:
            config, tokenizer = expert_config_and_tokenizer(path)
            configs.append(config)
            tokenizers.append(tokenizer)
        provider_model = None if pcm is None else pcm.model
        names = [f"expert {i} ({p})" for i, p in enumerate(self.expert_paths)]
        if provider_model is not None:
            configs.append(provider_model.config)
            names.append("the weight provider's model")
            _check_provider_model(provider_model, self.device, dtype)
        check_same_vocabulary(names, configs, tokenizers + [getattr(pcm, "tokenizer", None)])
        self.tokenizer = tokenizers[0]
        self.model_names = names
        self.configs = configs
        self.eos_ids = eos_token_ids(self.expert_paths[0], configs[0], self.tokenizer)

        self.num_kv_blocks = self._pool_size(num_kv_blocks, kv_cache_memory, dtype, max_num_seqs)

        models, groups = load_experts(self.expert_paths, self.device, dtype)
        if provider_model is not None:
            models.append(provider_model)
            groups.append(ForwardGroup(provider_model, {self.num_experts: -1}))
        self.pool = KVPool(configs, self.num_kv_blocks, block_size, dtype, self.device)
        self.block_manager = BlockManager(self.num_kv_blocks, block_size, self.pool.copy_block)
        self.scheduler = Scheduler(self.block_manager, self.eos_ids, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(models, groups, self.num_experts, self.pool, block_size, pcm, mix_mode)
        self.max_num_batched_tokens = max_num_batched_tokens

    def _pool_size(self, num_kv_blocks: int | None, kv_cache_memory: int | None, dtype: torch.dtype,
                   max_num_seqs: int) -> int:
        block_bytes = block_numel(self.configs, self.block_size) * dtype.itemsize
        if num_kv_blocks is not None:
            if isinstance(num_kv_blocks, bool) or not isinstance(num_kv_blocks, int) or num_kv_blocks < 1:
                raise ValueError(f"num_kv_blocks must be an int >= 1, got {num_kv_blocks!r}")
            return num_kv_blocks
        if kv_cache_memory is None:
            useful = max_num_seqs * sum(-(-context_limit(c) // self.block_size) for c in self.configs)
            budget = int(free_memory(self.device) * KV_MEMORY_FRACTION.get(self.device.type, 0.25))
            if self.device.type == "cpu":
                budget = min(budget, KV_MEMORY_CAP_CPU)
            return max(1, min(useful, budget // block_bytes))
        if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, int) \
                or kv_cache_memory < block_bytes:
            raise ValueError(f"kv_cache_memory={kv_cache_memory!r} bytes holds no KV block "
                             f"({block_bytes} bytes)")
        return kv_cache_memory // block_bytes

    def generate(self, prompts: list[str] | list[list[int]], weights: list | Tensor | None = None,
                 preferences: list[str] | None = None,
                 sampling: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[Output]:
        """Generate responses; `sampling.n` per prompt, prompt-major. Exactly one of `weights` (B, K) and
        `preferences` (B,) (which need a weight provider); neither means weight 1 when K == 1."""
        prompt_ids, texts = self._encode(prompts)
        samplings = _sampling_list(sampling, len(prompts))
        rows, actives, provider_ids = self._mixture(texts, weights, preferences)
        seqs = [self._sequence(i, prompt_ids[i], provider_ids[i], samplings[i], rows[i], actives[i])
                for i in range(len(prompts))]
        for seq in seqs:
            self.scheduler.add(seq)
        finished: list[Sequence] = []
        samples_left = [s.n for s in samplings]
        with tqdm(total=len(prompts), disable=not progress, desc="generate") as bar:
            try:
                while not self.scheduler.is_finished():
                    step, is_prefill = self.scheduler.schedule()
                    done = self.scheduler.postprocess(step, self.runner.run(step, is_prefill))
                    finished += done
                    for seq in done:
                        samples_left[seq.request] -= 1
                        bar.update(samples_left[seq.request] == 0)
            except BaseException:
                self._abort()
                raise
        finished.sort(key=lambda s: (s.request, s.sample))
        return [self._output(seq, prompt_ids[seq.request], provider_ids[seq.request]) for seq in finished]

    def reset_prefix_cache(self, model: int | None = None) -> None:
        """Forget cached KV blocks of model `model` (an expert index, or K for the weight provider's model),
        or of every model when None: call it after changing that model's weights."""
        count = len(self.runner.models)
        models = range(count) if model is None else [model]
        if not all(isinstance(m, int) and not isinstance(m, bool) and 0 <= m < count for m in models):
            raise ValueError(f"model must be None or an index in [0, {count}), got {model!r}")
        for m in models:
            self.block_manager.forget_model(m)

    def score(self, prompts: list[str] | list[list[int]],
              responses: list[str] | list[list[int]]) -> list[Tensor]:
        """Teacher-forced log-probs of every expert for each response's tokens: per request (T_i, K) fp32."""
        prompt_ids, _ = self._encode(prompts)
        if not isinstance(responses, list | tuple) or len(responses) != len(prompt_ids):
            raise ValueError(f"responses must be a list of {len(prompt_ids)} strings or token id lists")
        for i, response in enumerate(responses):
            if not isinstance(response, str | list | tuple):
                raise ValueError(f"responses[{i}] must be a string or a list of token ids, "
                                 f"got {type(response).__name__}")
        encode = lambda r: self.tokenizer.encode(r, add_special_tokens=False)
        response_ids = [list(r) if isinstance(r, list | tuple) else encode(r) for r in responses]
        for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            self._check_token_ids(f"responses[{i}]", response, allow_empty=True)
            limit = min(context_limit(c) for c in self.configs[:self.num_experts])
            if len(prompt) + len(response) > limit:
                raise ValueError(f"prompts[{i}] + responses[{i}] have {len(prompt) + len(response)} tokens, "
                                 f"more than the experts' context ({limit})")
        requests = list(zip(prompt_ids, response_ids, strict=True))
        return self.runner.score(requests, self.max_num_batched_tokens)

    def _encode(self, prompts) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of every prompt (strings are tokenized, id lists decoded)."""
        if not isinstance(prompts, list | tuple) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or of token id lists")
        ids, texts = [], []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str | list | tuple):
                raise ValueError(f"prompts[{i}] must be a string or a list of token ids, "
                                 f"got {type(prompt).__name__}")
            ids.append(self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt))
            self._check_token_ids(f"prompts[{i}]", ids[-1])  # before the tokenizer decodes them
            texts.append(prompt if isinstance(prompt, str) else self.tokenizer.decode(ids[-1]))
        return ids, texts

    def _check_token_ids(self, name: str, ids: list, allow_empty: bool = False) -> None:
        if not ids and not allow_empty:
            raise ValueError(f"{name} is empty")
        vocab = self.configs[0].vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"{name} must hold token ids in [0, {vocab})")

    def _mixture(self, texts: list[str], weights, preferences
                 ) -> tuple[list[list[float] | None], list[list[bool]], list[list[int]]]:
        """Per request: fixed weights (None: the provider decides), active-expert mask, provider token ids."""
        batch, k = len(texts), self.num_experts
        if weights is not None and preferences is not None:
            raise ValueError("pass either weights or preferences, not both")
        if preferences is not None:
            if self.provider is None:
                raise ValueError("preferences need a weight provider (pcm); pass weights instead")
            if not isinstance(preferences, list | tuple) or len(preferences) != batch:
                raise ValueError(f"preferences must be a list of {batch} strings, one per prompt")
            prepared = [self.provider.prepare(t, p) for t, p in zip(texts, preferences, strict=True)]
            masks = [list(map(bool, mask)) for _, mask in prepared]
            for i, mask in enumerate(masks):
                if len(mask) != k or not any(mask):
                    raise ValueError(f"the weight provider's mask for preferences[{i}] must have {k} "
                                     f"entries, at least one active; got {mask}")
            has_model = self.provider.model is not None
            return [None] * batch, masks, [list(ids) if has_model else [] for ids, _ in prepared]
        if weights is None:
            if k != 1:
                raise ValueError(f"pass weights (B, {k}) or preferences: the engine has {k} experts")
            weights = [[1.0]] * batch
        try:
            table = torch.as_tensor(weights, dtype=torch.float32).cpu()
        except (TypeError, ValueError) as e:  # strings, ragged rows
            raise ValueError(f"weights must be a (B, K) = ({batch}, {k}) table of numbers: {e}") from e
        if table.shape != (batch, k):
            raise ValueError(f"weights must have shape (B, K) = ({batch}, {k}), got {tuple(table.shape)}")
        check_simplex(table, table > 0, "weights")
        return table.tolist(), (table > 0).tolist(), [[] for _ in range(batch)]

    def _sequence(self, request: int, prompt_ids: list[int], provider_ids: list[int],
                  sampling: SamplingParams, weights: list[float] | None, active: list[bool]) -> Sequence:
        """A waiting sequence with one track per model it runs; ValueError if it can never fit."""
        tracks = [Track(k, prompt_ids) for k in range(self.num_experts) if active[k]]
        if weights is None and self.provider.model is not None:
            if not provider_ids:
                raise ValueError(f"the weight provider gave no token ids for request {request}")
            tracks.append(Track(self.num_experts, provider_ids))
        room = sampling.max_tokens
        for track in tracks:
            limit, length = context_limit(self.configs[track.model]), len(track.prompt_ids)
            if length > limit:
                raise ValueError(f"prompts[{request}] has {length} tokens for "
                                 f"{self.model_names[track.model]}, more than its context ({limit})")
            room = min(room, limit - length + 1)
        blocks = sum(-(-(len(t.prompt_ids) + room - 1) // self.block_size) for t in tracks)
        if blocks > self.num_kv_blocks:
            raise ValueError(f"prompts[{request}] needs up to {blocks} KV blocks, more than the pool's "
                             f"{self.num_kv_blocks}: raise num_kv_blocks or kv_cache_memory, "
                             "or lower max_tokens")
        return Sequence(request, tracks, sampling, weights, active, room)

    def _output(self, seq: Sequence, prompt_ids: list[int], provider_ids: list[int]) -> Output:
        k = self.num_experts
        return Output(
            token_ids=seq.completion_ids,
            text=self.tokenizer.decode(seq.completion_ids, skip_special_tokens=True),
            logprobs=torch.tensor(seq.logprobs, dtype=torch.float32),
            expert_logprobs=torch.tensor(seq.expert_logprobs, dtype=torch.float32).reshape(-1, k),
            weights=torch.tensor(seq.mix_weights, dtype=torch.float32).reshape(-1, k),
            finish_reason=seq.finish_reason,
            prompt_token_ids=prompt_ids,
            provider_prompt_ids=provider_ids,
        )

    def _abort(self) -> None:
        """Drop every unfinished sequence (after an error mid-generate), freeing its blocks."""
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.block_manager.deallocate(seq)
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()


def _sampling_list(sampling, batch: int) -> list[SamplingParams]:
    if sampling is None:
        return [SamplingParams()] * batch
    if isinstance(sampling, SamplingParams):
        return [sampling] * batch
    if not isinstance(sampling, list | tuple) or len(sampling) != batch \
            or not all(isinstance(s, SamplingParams) for s in sampling):
        raise ValueError(f"sampling must be a SamplingParams or a list of {batch} of them")
    return list(sampling)


def _check_provider_model(model, device: torch.device, dtype: torch.dtype) -> None:
    param = next(model.parameters())
    if param.dtype != dtype or param.device.type != device.type:
        raise ValueError(f"the weight provider's model is {param.dtype} on {param.device}; the engine runs "
                         f"{dtype} on {device}")


def check_same_vocabulary(names: list[str], configs: list[ModelConfig], tokenizers: list) -> None:
    """ValueError naming the two models unless all have the same vocab_size and their tokenizers (where
    known) give every token the same id (a special token only one of them adds, on an id the other leaves
    unused, is allowed: transformers adds some per architecture)."""
    for i in range(1, len(configs)):
        if configs[i].vocab_size != configs[0].vocab_size:
            raise ValueError(f"{names[0]} and {names[i]} do not share a vocabulary: vocab_size "
                             f"{configs[0].vocab_size} vs {configs[i].vocab_size}")
    reference = tokenizers[0].get_vocab()
    reference_ids = {i: token for token, i in reference.items()}
    for i, tokenizer in enumerate(tokenizers[1:], start=1):
        if tokenizer is None:
            continue
        for token, token_id in tokenizer.get_vocab().items():
            if reference.get(token, token_id) != token_id or reference_ids.get(token_id, token) != token:
                raise ValueError(f"{names[0]} and {names[i]} do not share a tokenizer: token {token!r} has "
                                 f"id {token_id} in {names[i]}")


def eos_token_ids(path: Path, config: ModelConfig, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's, the config's and generation_config.json's (an int or a list)."""
    ids = set()
    sources = [tokenizer.eos_token_id, config.eos_token_id]
    generation_config = path / "generation_config.json"
    if generation_config.is_file():
        sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    for source in sources:
        ids.update(source if isinstance(source, list) else [] if source is None else [source])
    return ids


def context_limit(config: ModelConfig) -> int:
    """Longest sequence a model serves (sliding-window attention is exact only within the window)."""
    return min(config.max_position_embeddings, config.sliding_window or config.max_position_embeddings)


def free_memory(device: torch.device) -> int:
    """Free bytes on `device` (CUDA: free GPU memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
