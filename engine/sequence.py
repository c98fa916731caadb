"""A sequence being generated: its prompt per model, its response so far, and what was recorded per token."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum, auto

from mope.engine.sampling_params import SamplingParams


def row_seed(seed: int, request: int, sample: int) -> int:
    """The int64 seed of a row's RNG stream: a hash of (sampling seed, request index, sample index)."""
    digest = hashlib.blake2b(f"{seed},{request},{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class Track:
    """One (sequence, model) pair: the prompt that model reads and where its KV blocks are.

    The model reads `prompt_ids + sequence.completion_ids`; `num_cached_tokens` of them are in the cache.
    The first `num_hashed_blocks` blocks are registered in the prefix cache, the last one under `last_hash`.
    `twin`, during a prefill only: a track of the same step with the same model and tokens, whose blocks this
    one shares and whose result it takes instead of computing its own.
    """

    model: int
    prompt_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_hashed_blocks: int = 0
    last_hash: int = -1  # the chain's start
    twin: Track | None = None


class Sequence:
    """One response being generated for request `request` (sample `sample` of its `n`).

    `weights` are the request's fixed mixture weights (K,), or None when a weight provider decides them.
    `active` is the mask (K,) of the experts it runs. The row's RNG stream is `seed` at offset = the number
    of tokens generated so far, so a preempted and re-run sequence draws the same tokens.
    """

    def __init__(self, request: int, tracks: list[Track], sampling: SamplingParams,
                 weights: list[float] | None, active: list[bool], max_completion: int, sample: int = 0):
        self.request = request
        self.sample = sample
        self.tracks = tracks
        self.sampling = sampling
        self.seed = row_seed(sampling.seed, request, sample)
        self.weights = weights
        self.active = active
        self.max_completion = max_completion
        self.num_samples = sampling.n  # drawn from the prefill's logits, then forked; 1 afterwards
        self.status = SequenceStatus.WAITING
        self.completion_ids: list[int] = []
        self.logprobs: list[float] = []
        self.expert_logprobs: list[list[float]] = []
        self.mix_weights: list[list[float]] = []
        self.finish_reason: str | None = None

    def num_tokens(self, track: Track) -> int:
        return len(track.prompt_ids) + len(self.completion_ids)

    def token_ids(self, track: Track, start: int, end: int) -> list[int]:
        """Tokens [start, end) of what `track`'s model reads."""
        prompt_len = len(track.prompt_ids)
        if end <= prompt_len:
            return track.prompt_ids[start:end]
        head = track.prompt_ids[start:] if start < prompt_len else []
        return head + self.completion_ids[max(start - prompt_len, 0):end - prompt_len]

    def last_token(self) -> int:
        return self.completion_ids[-1]

    def append(self, token: int, logprob: float, expert_logprobs: list[float], weights: list[float]) -> None:
        self.completion_ids.append(token)
        self.logprobs.append(logprob)
        self.expert_logprobs.append(expert_logprobs)
        self.mix_weights.append(weights)

    def fork(self, sample: int) -> Sequence:
        """Sample `sample` of the same request, sharing this sequence's blocks (the block manager adds the
        references) and its response so far."""
        tracks = [Track(t.model, t.prompt_ids, list(t.block_table), t.num_cached_tokens, t.num_hashed_blocks,
                        t.last_hash) for t in self.tracks]
        child = Sequence(self.request, tracks, self.sampling, self.weights, self.active, self.max_completion,
                         sample)
        child.num_samples = 1
        child.status = self.status
        child.completion_ids = list(self.completion_ids)
        child.logprobs = list(self.logprobs)
        child.expert_logprobs = list(self.expert_logprobs)
        child.mix_weights = list(self.mix_weights)
        return child
