"""Continuous batching: which sequences run next (prefill first); preempt the youngest when blocks run out."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from mope.engine.block_manager import BlockManager
from mope.engine.sequence import Sequence, SequenceStatus, Track


@dataclass
class StepResult:
    """What a step sampled, one row per sample (a prefill row of a request with n > 1 gives n rows)."""

    tokens: list[int]
    logprobs: list[float]
    expert_logprobs: list[list[float]]
    weights: list[list[float]]


class Scheduler:
    """Keeps the waiting and running sequences. Each step is either a prefill of newly admitted sequences
    or one decode token for every running sequence; a finished sequence frees its blocks at once."""

    def __init__(self, block_manager: BlockManager, eos_ids: set[int], max_num_seqs: int,
                 max_num_batched_tokens: int):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.block_manager = block_manager
        self.eos_ids = eos_ids
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill."""
        scheduled: list[Sequence] = []
        num_seqs, num_batched_tokens = len(self.running), 0
        same_step: dict[tuple, Track] = {}  # identical prompts of one prefill are computed once
        while self.waiting:
            seq = self.waiting[0]
            if num_seqs > 0 and num_seqs + seq.num_samples > self.max_num_seqs:
                break
            # net of prefix-cache hits and twins: a shared system prompt does not fill the budget
            num_tokens, num_blocks = self.block_manager.admission_cost(seq, same_step)
            too_many_tokens = scheduled and num_batched_tokens + num_tokens > self.max_num_batched_tokens
            if too_many_tokens or num_blocks > self.block_manager.num_free_blocks:
                break
            self.block_manager.allocate(seq, same_step)
            seq.status = SequenceStatus.RUNNING
            self.running.append(self.waiting.popleft())
            scheduled.append(seq)
            num_seqs, num_batched_tokens = num_seqs + seq.num_samples, num_batched_tokens + num_tokens
        if scheduled:
            return scheduled, True

        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.append_slot(seq)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled, False

    def preempt(self, seq: Sequence) -> None:
        """Free all of a sequence's blocks; it is recomputed later with its response so far kept."""
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], result: StepResult) -> list[Sequence]:
        """Record a step's samples (forking requests with n > 1 after their prefill); return the sequences
        that finished, whose blocks are already freed."""
        finished, row = [], 0
        for seq in seqs:
            for track in seq.tracks:
                track.num_cached_tokens, track.twin = seq.num_tokens(track), None
            self.block_manager.register_computed(seq)
            samples = [seq]
            if seq.num_samples > 1:
                samples += [seq.fork(sample) for sample in range(1, seq.num_samples)]
                seq.num_samples = 1
                for child in samples[1:]:
                    self.block_manager.fork(child)
                    self.running.append(child)
            for sample in samples:
                token = result.tokens[row]
                sample.append(token, result.logprobs[row], result.expert_logprobs[row], result.weights[row])
                row += 1
                if token in self.eos_ids and not sample.sampling.ignore_eos:
                    sample.finish_reason = "stop"
                elif len(sample.completion_ids) >= sample.max_completion:
                    sample.finish_reason = "length"
                else:
                    continue
                sample.status = SequenceStatus.FINISHED
                self.block_manager.deallocate(sample)
                self.running.remove(sample)
                finished.append(sample)
        return finished
