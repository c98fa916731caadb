"""Scheduler: continuous batching, finishing, fork after prefill, preemption of the youngest (no model)."""

import pytest
from mope.engine.block_manager import BlockManager
from mope.engine.sampling_params import SamplingParams
from mope.engine.scheduler import Scheduler, StepResult
from mope.engine.sequence import Sequence, SequenceStatus, Track

BS = 4
EOS = 0


def make_seq(request: int, prompt_len: int, max_tokens: int = 5, n: int = 1, ignore_eos: bool = False):
    sampling = SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=ignore_eos)
    return Sequence(request, [Track(0, [request + 1] * prompt_len)], sampling, [1.0], [True], max_tokens)


def fake_step(scheduler: Scheduler, next_token) -> tuple[list[Sequence], bool, list[Sequence]]:
    """Schedule, 'sample' next_token(seq, sample index) for every row, postprocess."""
    seqs, is_prefill = scheduler.schedule()
    tokens = []
    for seq in seqs:
        tokens += [next_token(seq, j) for j in range(seq.num_samples)]
    result = StepResult(tokens, [-1.0] * len(tokens), [[-1.0]] * len(tokens), [[1.0]] * len(tokens))
    return seqs, is_prefill, scheduler.postprocess(seqs, result)


def run_to_end(scheduler: Scheduler, next_token) -> list[Sequence]:
    done = []
    for _ in range(1000):
        if scheduler.is_finished():
            return done
        done += fake_step(scheduler, next_token)[2]
    raise AssertionError("the scheduler did not finish")


def test_new_requests_join_while_others_decode_and_finished_ones_free_their_blocks():
    manager = BlockManager(64, BS)
    scheduler = Scheduler(manager, {EOS}, max_num_seqs=2, max_num_batched_tokens=100)
    short, long_ = make_seq(0, 3, max_tokens=2), make_seq(1, 5, max_tokens=6)
    late = make_seq(2, 2, max_tokens=3)
    for seq in (short, long_, late):
        scheduler.add(seq)
    seqs, is_prefill, _ = fake_step(scheduler, lambda s, j: 7)
    assert is_prefill and seqs == [short, long_]  # max_num_seqs=2: the third waits
    seqs, is_prefill, finished = fake_step(scheduler, lambda s, j: 7)
    assert not is_prefill and seqs == [short, long_] and finished == [short]
    assert short.finish_reason == "length" and short.tracks[0].block_table == []
    seqs, is_prefill, _ = fake_step(scheduler, lambda s, j: 7)
    assert is_prefill and seqs == [late]  # joins while `long_` is mid-way
    seqs, is_prefill, _ = fake_step(scheduler, lambda s, j: 7)
    assert not is_prefill and seqs == [long_, late]
    run_to_end(scheduler, lambda s, j: 7)
    assert [len(s.completion_ids) for s in (short, long_, late)] == [2, 6, 3]
    assert manager.num_free_blocks == 64


def test_eos_stops_unless_ignored():
    scheduler = Scheduler(BlockManager(16, BS), {EOS, 9}, max_num_seqs=4, max_num_batched_tokens=100)
    stops, ignores = make_seq(0, 3), make_seq(1, 3, ignore_eos=True)
    scheduler.add(stops)
    scheduler.add(ignores)
    run_to_end(scheduler, lambda s, j: 9 if len(s.completion_ids) == 1 else 5)
    assert stops.completion_ids == [5, 9] and stops.finish_reason == "stop"
    assert ignores.completion_ids == [5, 9, 5, 5, 5] and ignores.finish_reason == "length"


def test_token_budget_splits_prefills_but_always_admits_one():
    scheduler = Scheduler(BlockManager(64, BS), {EOS}, max_num_seqs=8, max_num_batched_tokens=10)
    seqs = [make_seq(0, 12), make_seq(1, 4), make_seq(2, 4), make_seq(3, 4)]
    for seq in seqs:
        scheduler.add(seq)
    assert fake_step(scheduler, lambda s, j: 7)[0] == seqs[:1]  # longer than the budget, alone
    assert fake_step(scheduler, lambda s, j: 7)[0] == seqs[1:3]
    assert fake_step(scheduler, lambda s, j: 7)[0] == seqs[3:]


def test_token_budget_counts_only_what_a_prefill_computes():
    """Requests sharing a cached system prompt, and a repeated prompt, fill the budget by their own tokens."""
    manager = BlockManager(64, BS)
    scheduler = Scheduler(manager, {EOS}, max_num_seqs=8, max_num_batched_tokens=10)
    system = [5] * 8  # two full blocks
    warm = Sequence(0, [Track(0, system + [1])], SamplingParams(max_tokens=1), [1.0], [True], 1)
    scheduler.add(warm)
    assert fake_step(scheduler, lambda s, j: 7)[0] == [warm]  # computes and caches the system prompt
    questions = [Sequence(i, [Track(0, system + [i, i])], SamplingParams(max_tokens=1), [1.0], [True], 1)
                 for i in range(1, 5)]
    repeat = Sequence(5, [Track(0, system + [4, 4])], SamplingParams(max_tokens=1), [1.0], [True], 1)
    for seq in (*questions, repeat):
        scheduler.add(seq)
    # each question computes 2 tokens past the 8 cached (10 would be counted in full); the repeat is a twin
    seqs, is_prefill = scheduler.schedule()
    assert is_prefill and seqs == [*questions, repeat]
    assert [s.tracks[0].num_cached_tokens for s in questions] == [8] * 4
    assert repeat.tracks[0].twin is questions[-1].tracks[0]
    scheduler.postprocess(seqs, StepResult([7] * 5, [-1.0] * 5, [[-1.0]] * 5, [[1.0]] * 5))
    assert scheduler.is_finished() and manager.num_free_blocks == 64


def test_n_samples_are_forked_after_the_prefill_and_share_the_prompt_blocks():
    manager = BlockManager(16, BS)
    scheduler = Scheduler(manager, {EOS}, max_num_seqs=8, max_num_batched_tokens=100)
    parent = make_seq(0, 6, max_tokens=3, n=3)
    scheduler.add(parent)
    seqs, is_prefill, _ = fake_step(scheduler, lambda s, j: 10 + j)
    assert is_prefill and seqs == [parent]
    family = list(scheduler.running)
    assert [s.sample for s in family] == [0, 1, 2]
    assert [s.completion_ids for s in family] == [[10], [11], [12]]
    assert len({s.seed for s in family}) == 3
    assert all(s.tracks[0].block_table == parent.tracks[0].block_table for s in family)
    assert manager.num_free_blocks == 14
    seqs, is_prefill, _ = fake_step(scheduler, lambda s, j: 20 + s.sample)
    assert not is_prefill and seqs == family
    assert manager.num_free_blocks == 12  # two copies of the shared partial block, the last owner kept it
    run_to_end(scheduler, lambda s, j: 30)
    assert [s.completion_ids for s in family] == [[10, 20, 30], [11, 21, 30], [12, 22, 30]]
    assert manager.num_free_blocks == 16


def test_preemption_frees_the_youngest_and_recomputes_it_with_its_tokens_kept():
    manager = BlockManager(5, BS)
    scheduler = Scheduler(manager, {EOS}, max_num_seqs=8, max_num_batched_tokens=100)
    old, young = make_seq(0, 4, max_tokens=8), make_seq(1, 4, max_tokens=8)
    scheduler.add(old)
    scheduler.add(young)

    def token(seq, j):  # depends on the sequence's own history only, like a seeded sampler
        return 100 * (seq.request + 1) + len(seq.completion_ids)

    fake_step(scheduler, token)  # prefill both: 2 blocks; decode needs 2 more, then 2 more at 9 tokens
    preempted_with = None
    for _ in range(50):
        if scheduler.is_finished():
            break
        seqs, is_prefill, _ = fake_step(scheduler, token)
        if young.status == SequenceStatus.WAITING and preempted_with is None:
            preempted_with = list(young.completion_ids)
            assert young.tracks[0].block_table == []
            assert not is_prefill and young not in seqs and old in seqs
    assert scheduler.num_preemptions >= 1 and preempted_with
    expected = lambda r: [100 * (r + 1) + i for i in range(8)]
    assert old.completion_ids == expected(0) and young.completion_ids == expected(1)
    assert manager.num_free_blocks == 5


@pytest.mark.parametrize("argument", ["max_num_seqs", "max_num_batched_tokens"])
def test_bad_limits_are_rejected(argument):
    limits = {"max_num_seqs": 4, "max_num_batched_tokens": 64, argument: 0}
    with pytest.raises(ValueError, match=argument):
        Scheduler(BlockManager(4, BS), {EOS}, **limits)
