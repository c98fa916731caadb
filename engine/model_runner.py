"""One engine step: each model forwards the rows that use it, the weights are decided, `mix_sample` draws."""

from __future__ import annotations

import torch
from mope.engine.context import AttentionContext
from mope.engine.experts import ForwardGroup
from mope.engine.kv_pool import KVPool
from mope.engine.lora import LoRAGroup
from mope.engine.scheduler import StepResult
from mope.engine.sequence import Sequence, Track, row_seed
from mope.engine.weight_provider import WeightProvider, check_simplex
from mope.kernels.decode_layers import decode_layers
from mope.kernels.mix_sample import mix_sample
from torch import Tensor, nn


class ModelRunner:
    """Runs `models` (the K experts, then the provider's model if any; each callable like a CausalLM) over
    the shared KV pool, one forward per group (adapters of one base share theirs)."""

    def __init__(self, models: list[nn.Module], groups: list[ForwardGroup], num_experts: int, pool: KVPool,
                 block_size: int, provider: WeightProvider | None, mix_mode: str):
        self.models = models
        self.groups = groups
        self.num_experts = num_experts
        self.pool = pool
        self.block_size = block_size
        self.provider = provider
        self.provider_name = f"weight provider {type(provider).__name__}"
        self.mix_mode = mix_mode
        self.device = pool.buffer.device
        # Reused (K, rows, V) logits; rows of experts a request does not use are never read (weight 0).
        self.logits = torch.zeros(num_experts, 0, models[0].config.vocab_size, device=self.device)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> StepResult:
        """Forward every model over its rows, mix and sample; one result row per sample (see StepResult)."""
        batch = len(seqs)
        if self.logits.shape[1] < batch:
            self.logits = torch.zeros(self.num_experts, batch, self.logits.shape[2], device=self.device)
        logits = self.logits[:, :batch]
        provider_hidden = None
        rows_per_model = self._rows_per_model(seqs)
        work = []  # (group, its members with rows this step, their (sequence, track) rows)
        for group in self.groups:
            members = [m for m in group.members if m in rows_per_model]
            if members:
                entries = [(seqs[row], track) for m in members for row, track in rows_per_model[m]]
                work.append((group, members, entries))
        for (_, members, _), hidden in zip(work, self._forward(work, is_prefill), strict=True):
            for model, model_hidden in zip(members, hidden.split([len(rows_per_model[m]) for m in members]),
                                           strict=True):
                if model < self.num_experts:
                    rows = self._tensor([row for row, _ in rows_per_model[model]], torch.int64)
                    logits[model].index_copy_(0, rows, self.models[model].compute_logits(model_hidden))
                else:
                    provider_hidden = model_hidden
        weights = self._weights(seqs, provider_hidden)

        samples = [(seq, j) for seq in seqs for j in range(seq.num_samples)]
        if len(samples) > batch:  # a prefill of a request with n > 1: each sample draws from its logits
            index = torch.tensor([i for i, seq in enumerate(seqs) for _ in range(seq.num_samples)],
                                 device=self.device)
            logits, weights = logits.index_select(1, index), weights.index_select(0, index)
        params = [seq.sampling for seq, _ in samples]
        seeds = [seq.seed if j == 0 else row_seed(seq.sampling.seed, seq.request, j) for seq, j in samples]
        drawn = mix_sample(
            logits, weights,
            temperature=self._tensor([p.temperature for p in params], torch.float32),
            top_p=self._tensor([p.top_p for p in params], torch.float32),
            top_k=self._tensor([p.top_k for p in params], torch.int64),
            seed=self._tensor(seeds, torch.int64),
            offset=self._tensor([len(seq.completion_ids) for seq, _ in samples], torch.int64),
            mode=self.mix_mode,
        )
        return StepResult(drawn.tokens.tolist(), drawn.logprobs.tolist(), drawn.expert_logprobs.tolist(),
                          weights.tolist())

    def _tensor(self, values: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _rows_per_model(self, seqs: list[Sequence]) -> dict[int, list[tuple[int, Track]]]:
        rows: dict[int, list[tuple[int, Track]]] = {}
        for row, seq in enumerate(seqs):
            for track in seq.tracks:
                rows.setdefault(track.model, []).append((row, track))
        return rows

    def _forward(self, work: list[tuple[ForwardGroup, list[int], list[tuple[Sequence, Track]]]],
                 is_prefill: bool) -> list[Tensor]:
        """Run each group over its rows' new tokens: the hidden state (rows, hidden) at each row's last one.
        A decode step's groups that take the one-call C++ path run in one `decode_layers` call, side by
        side on the cores; the others, and prefills, one forward each."""
        inputs = [self._inputs(group, entries, is_prefill) for group, _, entries in work]
        calls = [None if is_prefill or not hasattr(group.module, "decode_call")
                 else group.module.decode_call(*args, **kwargs)
                 for (group, _, _), (args, kwargs, _) in zip(work, inputs, strict=True)]
        outputs = []
        for hidden, (group, _, entries), (args, kwargs, cu_seqlens) in zip(decode_layers(calls), work, inputs,
                                                                           strict=True):
            out = hidden if hidden is not None else group.module(*args, **kwargs)
            outputs.append(self._last_hidden(out, entries, cu_seqlens) if is_prefill else out)
        return outputs

    def _inputs(self, group: ForwardGroup, entries: list[tuple[Sequence, Track]],
                is_prefill: bool) -> tuple[tuple, dict, list[int]]:
        """The group's forward arguments (args, kwargs) for its rows' new tokens (a prefill's twin tracks
        compute nothing), and the offsets of each computed track's tokens."""
        bs = self.block_size
        computed = [(seq, track) for seq, track in entries if track.twin is None]
        input_ids, positions, slots, context_lens, cu_seqlens, adapters = [], [], [], [], [0], []
        for seq, track in computed:
            num_tokens = seq.num_tokens(track)
            start = track.num_cached_tokens if is_prefill else num_tokens - 1
            input_ids += seq.token_ids(track, start, num_tokens) if is_prefill else [seq.last_token()]
            positions += range(start, num_tokens)
            table = track.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, num_tokens)]
            context_lens.append(num_tokens)
            cu_seqlens.append(cu_seqlens[-1] + num_tokens - start)
            adapters += [group.members[track.model]] * (num_tokens - start)
        width = max(len(track.block_table) for _, track in computed)
        block_tables = [track.block_table + [0] * (width - len(track.block_table)) for _, track in computed]
        tensor = self._tensor
        ctx = AttentionContext(
            is_prefill=is_prefill,
            cu_seqlens_q=tensor(cu_seqlens, torch.int32) if is_prefill else None,
            context_lens=tensor(context_lens, torch.int32),
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(block_tables, torch.int32),
        )
        args = (tensor(input_ids, torch.int64), tensor(positions, torch.int64), ctx,
                self.pool.views[entries[0][1].model])
        is_lora = isinstance(group.module, LoRAGroup)
        kwargs = {"adapter_index": tensor(adapters, torch.int64)} if is_lora else {}
        return args, kwargs, cu_seqlens

    def _last_hidden(self, hidden: Tensor, entries: list[tuple[Sequence, Track]],
                     cu_seqlens: list[int]) -> Tensor:
        """A prefill's hidden state at each row's last token (a twin track takes its twin's)."""
        tensor = self._tensor
        last = hidden.index_select(0, tensor(cu_seqlens[1:], torch.int64) - 1)
        computed = [track for _, track in entries if track.twin is None]
        if len(computed) == len(entries):
            return last
        row = {id(track): i for i, track in enumerate(computed)}
        rows = [row[id(track.twin or track)] for _, track in entries]
        return last.index_select(0, tensor(rows, torch.int64))

    def _weights(self, seqs: list[Sequence], provider_hidden: Tensor | None) -> Tensor:
        """(B, K) fp32: the fixed weights of each row, or what the provider decides for it now."""
        if all(seq.weights is not None for seq in seqs):
            return torch.tensor([seq.weights for seq in seqs], dtype=torch.float32, device=self.device)
        if any(seq.weights is not None for seq in seqs):
            raise ValueError("a step mixes requests with fixed weights and requests given by preference")
        active = torch.tensor([seq.active for seq in seqs], dtype=torch.bool, device=self.device)
        weights = self.provider.weights(provider_hidden, active)
        check_simplex(weights, active, self.provider_name)
        return weights.to(torch.float32)

    @torch.inference_mode()
    def score(self, requests: list[tuple[list[int], list[int]]], max_batched_tokens: int) -> list[Tensor]:
        """Teacher-forced log-probs (T_i, K) of every expert for each (prompt ids, response ids), in batched
        prefill passes that keep no cache."""
        scores: list[Tensor] = []
        batch: list[tuple[list[int], list[int]]] = []
        for request in requests:
            if batch and sum(len(p) + len(r) for p, r in batch) + len(request[0]) + len(request[1]) \
                    > max_batched_tokens:
                scores += self._score_batch(batch)
                batch = []
            batch.append(request)
        return scores + self._score_batch(batch) if batch else scores

    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[Tensor]:
        input_ids, positions, cu_seqlens, targets, predictors = [], [], [0], [], []
        for prompt, response in batch:
            start = cu_seqlens[-1]
            input_ids += prompt + response
            positions += range(len(prompt) + len(response))
            cu_seqlens.append(start + len(prompt) + len(response))
            predictors += range(start + len(prompt) - 1, start + len(prompt) + len(response) - 1)
            targets += response
        ctx = AttentionContext(is_prefill=True,
                               cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=self.device))
        ids = torch.tensor(input_ids, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        predictors = torch.tensor(predictors, dtype=torch.int64, device=self.device)
        targets = torch.tensor(targets, dtype=torch.int64, device=self.device)
        per_expert = []
        for model in self.models[:self.num_experts]:
            hidden = model(ids, pos, ctx, None).index_select(0, predictors)
            logprobs = torch.log_softmax(model.compute_logits(hidden), dim=-1)
            per_expert.append(logprobs.gather(1, targets[:, None])[:, 0])
        lengths = [len(response) for _, response in batch]
        return list(torch.stack(per_expert, dim=1).split(lengths))
