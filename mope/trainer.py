"""REBEL training of the PCM: rollout pairs with the engine, BT-normalised rewards, several AdamW epochs."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from mope.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from mope.config import TrainConfig
from mope.distributed import DistInfo, all_reduce_sum, shard_bounds
from mope.engine.sampling_params import SamplingParams
from mope.metrics import MetricsLog, plot_metrics
from mope.pcm import PCM
from mope.preferences import Preference, load_registry
from mope.rebel import mixture_token_logprobs, rebel_loss, sequence_logprobs
from mope.rewards import CachedReferences, FieldReferences, build_reward_model, preference_rewards

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# settings a resumed run may change: its length, I/O and where it runs (not what it trains)
RESUMABLE = ("steps", "checkpoint_every", "progress", "plot", "output_dir", "device", "num_kv_blocks",
             "extra")


@dataclass
class Rollout:
    """Two responses per (prompt, preference), adjacent; everything the update needs, per response."""

    prompts: list[str]  # instructions
    preferences: list[Preference]
    pcm_prompt_ids: list[list[int]]
    active: Tensor  # (2P, K) bool
    response_ids: list[list[int]]
    texts: list[str]
    old_logp: Tensor  # (2P,) the rollout's log pi, summed over tokens
    expert_logprobs: Tensor  # (sum T, K) recorded at rollout
    weights: Tensor  # (sum T, K) alpha at rollout

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]

    def pairs(self, start: int, end: int) -> Rollout:
        """The responses of pairs [start, end)."""
        lo, hi = 2 * start, 2 * end
        offsets = [0, *torch.tensor(self.lengths, dtype=torch.int64).cumsum(0).tolist()]
        return Rollout(self.prompts[lo:hi], self.preferences[lo:hi], self.pcm_prompt_ids[lo:hi],
                       self.active[lo:hi], self.response_ids[lo:hi], self.texts[lo:hi], self.old_logp[lo:hi],
                       self.expert_logprobs[offsets[lo]:offsets[hi]], self.weights[offsets[lo]:offsets[hi]])

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        return Rollout(*(sum((getattr(p, f) for p in parts), []) if isinstance(getattr(parts[0], f), list)
                         else torch.cat([getattr(p, f) for p in parts])
                         for f in Rollout.__dataclass_fields__))


def load_prompt_records(path: str | Path) -> list[dict]:
    """A JSON list of {"prompt": ...} records (or of plain strings), or a .jsonl file of them, one a line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = path.suffix.lower() == ".jsonl"
    try:
        text = path.read_text()
        data = [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"prompt file {path} is not valid JSON{' Lines' if lines else ''}: {e}") from e
    records = [{"prompt": r} if isinstance(r, str) else r for r in data] if isinstance(data, list) else None
    if not records or not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in records):
        raise ValueError(f"prompt file {path} must be a non-empty JSON list of strings or {{'prompt': ...}}")
    return records


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, ...): decorrelated streams, the same on every rank."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def build_pcm(config: TrainConfig) -> PCM:
    """The PCM a run starts from: a saved PCM, a HF backbone checkpoint, or a fresh Llama."""
    dtype, k = DTYPES[config.dtype], len(config.experts)
    if config.pcm is not None:
        path = Path(config.pcm)
        if (path / "pcm.json").is_file():  # its expert count is checked by the Trainer, as any PCM's
            return PCM.load(path, config.device, dtype)
    registry = load_registry(config.preferences_file) if config.preferences_file else None
    if config.pcm is not None:
        return PCM.from_backbone(config.pcm, k, config.device, dtype, seed=config.seed, registry=registry)
    settings = dict(config.pcm_backbone or {})
    tokenizer = settings.pop("tokenizer", config.experts[0])
    return PCM.fresh(tokenizer, k, config.device, dtype, seed=config.seed, registry=registry, **settings)


def check_resumable(saved: dict, config: TrainConfig) -> None:
    """Refuse to resume a run whose checkpoint was trained with other settings (``RESUMABLE`` may differ)."""
    current = json.loads(json.dumps(config.to_dict()))  # as stored: tuples become lists
    changed = [k for k in current if k not in RESUMABLE and k in saved and saved[k] != current[k]]
    if changed:
        raise ValueError(f"--resume: the config of {config.output_dir} differs from the checkpoint's in: "
                         f"{', '.join(changed)} (or choose another output_dir for a new run)")


class Trainer:
    """One REBEL run: a ``mope.Engine`` over the experts with the PCM as its weight provider. ``pcm`` and
    ``scorers`` override what the config builds; ``resume`` continues from the latest checkpoint."""

    def __init__(self, config: TrainConfig, pcm: PCM | None = None, scorers: dict | None = None,
                 dist_info: DistInfo | None = None, resume: bool = False):
        from mope.api import Engine

        self.config = config
        self.dist = dist_info or DistInfo(device=config.device)
        self.out = Path(config.output_dir)
        self.checkpoint = latest_checkpoint(self.out)
        if not resume and self.checkpoint is not None:
            raise ValueError(f"output_dir {self.out} already holds checkpoints of a run (the latest: "
                             f"{self.checkpoint.name}); pass resume=True (mope train --resume) to continue "
                             f"it, or choose another output_dir")
        if resume and self.checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.out / 'checkpoints'}")
        state = load_trainer_state(self.checkpoint) if resume else None
        if state is not None:
            check_resumable(json.loads(state["config"]), config)
            pcm = PCM.load(self.checkpoint / "pcm", config.device, DTYPES[config.dtype])
        self.pcm = pcm or build_pcm(config)
        if self.pcm.n_experts != len(config.experts):
            raise ValueError(f"the PCM has {self.pcm.n_experts} experts, the config lists "
                             f"{len(config.experts)}")
        self.pcm.expert_names = list(config.experts)
        self.registry = self.pcm.registry
        codes = config.preferences or [p.code for p in self.registry.combinations()]
        self.preferences = [self.registry.parse(c) for c in codes]
        self.records = load_prompt_records(config.prompts)
        self.scorers = scorers or {code: build_reward_model(spec) for code, spec in config.rewards.items()}
        for code in self.scorers:
            self.registry.get(code)
        missing = sorted({d.code for p in self.preferences for d in p.dimensions} - set(self.scorers))
        if missing:
            raise ValueError(f"train config: rewards has no reward model for dimensions {', '.join(missing)}")
        shard_bounds(config.batch_size, self.dist)
        if config.minibatch_size and config.minibatch_size % self.dist.world_size:
            raise ValueError(f"minibatch_size {config.minibatch_size} must be a multiple of the number of "
                             f"ranks {self.dist.world_size}")
        self.engine = Engine(experts=config.experts, pcm=self.pcm, device=config.device,
                             dtype=DTYPES[config.dtype], block_size=config.block_size,
                             num_kv_blocks=config.num_kv_blocks, mix_mode=config.mix_mode)
        self.references = (FieldReferences(self.records, config.reference.removeprefix("field:"))
                           if config.reference.startswith("field:") else CachedReferences(self._uniform))
        self.dims = [d.code for d in self.registry.dimensions]
        self.params = [p for p in self.pcm.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        minibatch = config.minibatch_size or config.batch_size
        total = config.steps * config.epochs * math.ceil(config.batch_size / minibatch)
        schedule = lambda i: lr_factor(config, i, total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.ddp = DistributedDataParallel(self.pcm) if self.dist.world_size > 1 else None
        self.step, self.nan_skipped = 0, 0
        if state is not None:
            self._load_state(state)

    # -- one step --------------------------------------------------------------------------------
    def batch(self, step: int) -> list[tuple[str, Preference]]:
        """This rank's (prompt, preference) pairs of ``step``: a draw that depends on (seed, step) only."""
        g = torch.Generator().manual_seed(derive_seed(self.config.seed, step))
        prompts = torch.randint(len(self.records), (self.config.batch_size,), generator=g).tolist()
        prefs = torch.randint(len(self.preferences), (self.config.batch_size,), generator=g).tolist()
        start, end = shard_bounds(self.config.batch_size, self.dist)
        return [(self.records[i]["prompt"], self.preferences[j]) for i, j in zip(prompts, prefs, strict=True)
                ][start:end]

    def rollout(self, batch: list[tuple[str, Preference]], step: int) -> Rollout:
        """Two sampled responses per pair from the engine (the prompt's KV blocks shared)."""
        c = self.config
        seed = derive_seed(c.seed, step, self.dist.rank)
        sampling = SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                  max_tokens=c.max_tokens, seed=seed, n=2)
        outs = self.engine.generate([self.registry.format_prompt(p) for p, _ in batch],
                                    preferences=[q.code for _, q in batch], sampling=sampling)
        pairs = [pair for pair in batch for _ in range(2)]
        masks = [q.active_mask(self.pcm.expert_names) for _, q in pairs]
        k = self.pcm.n_experts
        per_token = lambda xs: torch.cat([x.float().view(-1, k) for x in xs])
        return Rollout(
            prompts=[p for p, _ in pairs], preferences=[q for _, q in pairs],
            pcm_prompt_ids=[list(o.provider_prompt_ids) for o in outs],
            active=torch.tensor(masks, dtype=torch.bool),
            response_ids=[list(o.token_ids) for o in outs], texts=[o.text for o in outs],
            old_logp=torch.stack([o.logprobs.double().sum() for o in outs]).float(),
            expert_logprobs=per_token([o.expert_logprobs for o in outs]),
            weights=per_token([o.weights for o in outs]))

    def rewards(self, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        refs = self.references.get(rollout.prompts, rollout.preferences)
        return preference_rewards(self.scorers, rollout.prompts, rollout.preferences, rollout.texts, refs)

    def policy_logprobs(self, rollout: Rollout, model=None, expert_logits: Tensor | None = None) -> Tensor:
        """log pi_theta of every response (2P,), with gradients through the PCM only. Logit mode needs the
        experts' logits at the response tokens (computed here when not given)."""
        model = model or self.pcm
        log_w = model(rollout.pcm_prompt_ids, rollout.response_ids, rollout.active)
        if self.config.mix_mode == "prob":
            token_logp = mixture_token_logprobs(log_w, rollout.expert_logprobs.to(log_w.device))
        else:
            from mope.kernels import mix_logprobs

            if expert_logits is None:
                expert_logits = self._expert_logits(rollout)
            tokens = torch.tensor([t for r in rollout.response_ids for t in r], device=log_w.device)
            token_logp = mix_logprobs(expert_logits, log_w.exp(), tokens, temperature=self.config.temperature,
                                      mode="logit")
        return sequence_logprobs(token_logp, rollout.lengths)

    def update(self, rollout: Rollout, rewards: Tensor) -> tuple[float, bool]:
        """Epochs of AdamW on rebel_loss over the (local) pairs; returns the mean loss and whether every
        loss and gradient was finite (on every rank). A NaN/inf skips the rest of the update everywhere."""
        c, model = self.config, self.ddp or self.pcm
        pairs = len(rollout.prompts) // 2
        local_mb = (c.minibatch_size or c.batch_size) // self.dist.world_size
        parts = [(start, rollout.pairs(start, min(start + local_mb, pairs)))
                 for start in range(0, pairs, local_mb)]
        # the experts are frozen: their logits (logit mode) are computed once per step, not once per epoch
        logits = [self._expert_logits(part) if c.mix_mode == "logit" else None for _, part in parts]
        losses = []
        try:
            for _ in range(c.epochs):
                for (start, part), part_logits in zip(parts, logits, strict=True):
                    new_logp = self.policy_logprobs(part, model, part_logits)
                    device = new_logp.device
                    part_rewards = rewards[2 * start : 2 * start + len(part.prompts)].to(device)
                    loss = rebel_loss(new_logp, part.old_logp.to(device), part_rewards, c.eta)
                    self.optimizer.zero_grad(set_to_none=True)
                    if not self._all_finite(loss.detach()):
                        return math.nan, False
                    loss.backward()
                    if not self._all_finite(torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)):
                        self.optimizer.zero_grad(set_to_none=True)
                        return math.nan, False
                    self.optimizer.step()
                    self.scheduler.step()
                    losses.append(loss.item())
        finally:  # the PCM's KV in the engine's prefix cache is stale once the PCM changed
            self.engine.forget_provider_cache()
        return sum(losses) / len(losses), True

    def train_step(self, step: int) -> dict:
        """Rollout, rewards and update of ``step``; the step's metrics (reduced over ranks)."""
        t0 = time.perf_counter()
        rollout = self.rollout(self.batch(step), step)
        t1 = time.perf_counter()
        rewards, per_dim = self.rewards(rollout)
        ok = self._all_finite(rewards)
        loss = math.nan
        t2 = time.perf_counter()
        if ok:
            loss, ok = self.update(rollout, rewards)
        t3 = time.perf_counter()
        if not ok:
            self.nan_skipped += 1
            warnings.warn(f"step {step}: NaN/inf reward or loss, update skipped "
                          f"({self.nan_skipped} skipped so far)", stacklevel=2)
        return self._metrics(step, rollout, rewards, per_dim, loss, ok, t1 - t0, t3 - t2)

    # -- the loop --------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> list[dict]:
        """Run steps ``self.step+1 .. until`` (default: config.steps); metrics JSONL, plot and atomic
        checkpoints on rank 0."""
        from tqdm import tqdm

        c, main = self.config, self.dist.is_main
        log = MetricsLog(self.out / "metrics.jsonl", self.step or None) if main else None  # keeps steps done
        if main:
            (self.out / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
        history = []
        last = c.steps if until is None else min(until, c.steps)
        bar = tqdm(range(self.step + 1, last + 1), disable=not (main and c.progress), desc="REBEL")
        for step in bar:
            record = self.train_step(step)
            self.step = step
            history.append(record)
            if main:
                log.write(record)
                bar.set_postfix(reward=f"{record['reward']:.3f}", loss=f"{record['loss']:.4f}")
                if step % c.checkpoint_every == 0 or step == c.steps:
                    save_checkpoint(self.out, step, self.pcm, self.state_dict())
        if main and c.plot:
            plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png")
        return history

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": json.dumps(self.config.to_dict()), "nan_skipped": self.nan_skipped,
        }

    def _load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.nan_skipped = state["step"], state["nan_skipped"]

    # -- helpers ---------------------------------------------------------------------------------
    def _uniform(self, prompts: list[str], preferences: list[Preference]) -> list[str]:
        """Greedy responses of uniform weights over each preference's active experts (the reference)."""
        k = self.pcm.n_experts
        weights = []
        for q in preferences:
            mask = q.active_mask(self.pcm.expert_names or k)
            weights.append([m / sum(mask) for m in mask])
        sampling = SamplingParams(temperature=0.0, max_tokens=self.config.max_tokens)
        outs = self.engine.generate([self.registry.format_prompt(p) for p in prompts], weights=weights,
                                    sampling=sampling)
        return [o.text for o in outs]

    def _expert_logits(self, rollout: Rollout) -> Tensor:
        prompts = [self.registry.format_prompt(p) for p in rollout.prompts]
        return self.engine.expert_logits(prompts, rollout.response_ids).to(self.pcm.head.weight.device)

    def _all_finite(self, t: Tensor) -> bool:
        bad = torch.tensor([0.0 if torch.isfinite(t).all() else 1.0])
        return all_reduce_sum(bad, self.dist).item() == 0

    def _metrics(self, step, rollout, rewards, per_dim, loss, ok, rollout_s, update_s) -> dict:
        k, n_dims = self.pcm.n_experts, len(self.dims)
        tokens = float(sum(rollout.lengths))
        # sums reduced over ranks: responses, tokens, loss, times, the finite rewards' sum and count, per
        # dimension the finite BT scores' sums and counts, weights (NaN rewards count in no mean)
        sums = torch.zeros(7 + 2 * n_dims + k, dtype=torch.float64)
        finite = lambda t: (t.double().nansum(), torch.isfinite(t).sum())
        (sums[0], sums[6]), sums[1] = finite(rewards), rewards.numel()
        for code, bt in per_dim.items():
            i = self.dims.index(code)
            sums[7 + i], sums[7 + n_dims + i] = finite(bt)
        sums[7 + 2 * n_dims :] = rollout.weights.double().sum(0)
        sums[2], sums[3], sums[4], sums[5] = tokens, loss if ok else 0.0, rollout_s, update_s
        sums = all_reduce_sum(sums, self.dist)
        world = self.dist.world_size
        reward = (sums[0] / sums[6]).item() if sums[6] > 0 else math.nan
        record = {"step": step, "reward": reward, "loss": (sums[3] / world).item() if ok
                  else math.nan, "skipped": not ok, "nan_skipped": self.nan_skipped,
                  "lr": self.scheduler.get_last_lr()[0], "response_tokens": (sums[2] / sums[1]).item()}
        for i, code in enumerate(self.dims):
            if sums[7 + n_dims + i] > 0:
                record[f"reward/{code}"] = (sums[7 + i] / sums[7 + n_dims + i]).item()
        for j in range(k):
            record[f"weight/{j}"] = (sums[7 + 2 * n_dims + j] / max(sums[2].item(), 1.0)).item()
        updated = sums[2].item() * self.config.epochs if ok else 0.0
        record["rollout_tokens_per_s"] = sums[2].item() / max(sums[4].item() / world, 1e-9)
        record["update_tokens_per_s"] = updated / max(sums[5].item() / world, 1e-9)
        return record


def lr_factor(config: TrainConfig, i: int, total: int) -> float:
    """Linear warm-up over ``warmup_steps`` optimiser steps, then cosine / linear decay to 0, or constant."""
    if i < config.warmup_steps:
        return (i + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min((i - config.warmup_steps) / max(total - config.warmup_steps, 1), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress
