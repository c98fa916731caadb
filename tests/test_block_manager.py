"""Block manager: allocation, reference counts, fork + copy-on-write, prefix cache, freeing."""

import pytest
from mope.engine.block_manager import BlockManager
from mope.engine.sampling_params import SamplingParams
from mope.engine.sequence import Sequence, Track

BS = 4


def make_seq(prompts: dict[int, list[int]], request: int = 0, n: int = 1) -> Sequence:
    """A sequence with one track per model: {model: prompt ids}."""
    tracks = [Track(model, list(prompt)) for model, prompt in prompts.items()]
    return Sequence(request, tracks, SamplingParams(n=n), [1.0], [True], max_completion=100)


def compute(manager: BlockManager, seq: Sequence) -> None:
    """What a step does to the cache bookkeeping: every token is now computed."""
    for track in seq.tracks:
        track.num_cached_tokens = seq.num_tokens(track)
    manager.register_computed(seq)


def test_allocate_gives_each_track_its_own_blocks_and_deallocate_frees_them():
    manager = BlockManager(10, BS)
    seq = make_seq({0: list(range(9)), 1: list(range(3))})
    assert manager.admission_cost(seq, {}) == (9, 3 + 1)
    manager.allocate(seq)
    tables = [t.block_table for t in seq.tracks]
    assert [len(t) for t in tables] == [3, 1]
    assert len(set(tables[0] + tables[1])) == 4
    assert manager.num_free_blocks == 6
    assert all(manager.blocks[b].ref_count == 1 for b in tables[0] + tables[1])
    assert [t.num_cached_tokens for t in seq.tracks] == [0, 0]
    manager.deallocate(seq)
    assert manager.num_free_blocks == 10
    assert all(t.block_table == [] for t in seq.tracks)


def test_append_slot_takes_a_block_only_when_the_last_one_is_full():
    manager = BlockManager(10, BS)
    seq = make_seq({0: list(range(4))})
    manager.allocate(seq)
    compute(manager, seq)
    grown = []
    for token in range(6):
        seq.append(100 + token, 0.0, [0.0], [1.0])
        assert manager.can_append(seq)
        manager.append_slot(seq)
        grown.append(len(seq.tracks[0].block_table))
        compute(manager, seq)
    # 5..10 tokens: positions 4 and 8 open a new block
    assert grown == [2, 2, 2, 2, 3, 3]
    assert manager.num_free_blocks == 7


def test_fork_shares_every_block_and_copy_on_write_splits_the_partly_filled_one():
    copies = []
    manager = BlockManager(10, BS, copy_block=lambda src, dst: copies.append((src, dst)))
    parent = make_seq({0: list(range(6))}, n=2)
    manager.allocate(parent)
    compute(manager, parent)
    child = parent.fork(1)
    manager.fork(child)
    full, partial = parent.tracks[0].block_table
    assert child.tracks[0].block_table == [full, partial]
    assert manager.blocks[full].ref_count == manager.blocks[partial].ref_count == 2
    assert manager.num_free_blocks == 8
    assert child.seed != parent.seed

    parent.append(7, 0.0, [0.0], [1.0])
    child.append(8, 0.0, [0.0], [1.0])
    manager.append_slot(parent)  # position 6 is in the shared partial block: parent gets a private copy
    new_block = parent.tracks[0].block_table[1]
    assert new_block != partial and copies == [(partial, new_block)]
    assert parent.tracks[0].block_table[0] == full
    assert manager.blocks[partial].ref_count == 1
    manager.append_slot(child)  # the child is now the partial block's only owner: it writes in place
    assert child.tracks[0].block_table == [full, partial] and len(copies) == 1
    assert manager.num_free_blocks == 7
    manager.deallocate(parent)
    assert manager.blocks[full].ref_count == 1 and manager.num_free_blocks == 8
    manager.deallocate(child)
    assert manager.num_free_blocks == 10


def test_can_append_counts_copy_on_write_blocks():
    manager = BlockManager(4, BS)
    parent = make_seq({0: list(range(6))}, n=2)
    manager.allocate(parent)
    compute(manager, parent)
    child = parent.fork(1)
    manager.fork(child)
    parent.append(1, 0.0, [0.0], [1.0])
    assert manager.can_append(parent)
    manager.append_slot(parent)
    other = make_seq({0: [1]})
    manager.allocate(other)  # takes the last free block
    child.append(2, 0.0, [0.0], [1.0])
    assert manager.can_append(child)  # sole owner of the partial block now: no block needed
    child.append(3, 0.0, [0.0], [1.0])
    child.append(4, 0.0, [0.0], [1.0])  # 9 tokens: position 8 opens a third block
    assert not manager.can_append(child)


def test_prefix_cache_reuses_computed_full_blocks_of_the_same_model_only():
    manager = BlockManager(20, BS)
    first = make_seq({0: list(range(10)), 1: list(range(10))})
    manager.allocate(first)
    assert [t.num_cached_tokens for t in first.tracks] == [0, 0]
    compute(manager, first)

    same_prefix = make_seq({0: list(range(9)) + [99], 2: list(range(10))})
    manager.allocate(same_prefix)
    track0, track2 = same_prefix.tracks
    assert track0.num_cached_tokens == 8  # two full blocks computed once for model 0
    assert track0.block_table[:2] == first.tracks[0].block_table[:2]
    assert track0.block_table[2] not in first.tracks[0].block_table
    assert manager.blocks[track0.block_table[0]].ref_count == 2
    assert track2.num_cached_tokens == 0  # model 2 never computed these tokens: no sharing across models
    assert not set(track2.block_table) & set(first.tracks[1].block_table)

    different_start = make_seq({0: [5] + list(range(1, 10))})
    manager.allocate(different_start)
    assert different_start.tracks[0].num_cached_tokens == 0  # the chain breaks at the first block


def test_an_identical_track_of_the_same_step_shares_its_twins_blocks_and_copies_on_write():
    copies = []
    manager = BlockManager(20, BS, copy_block=lambda src, dst: copies.append((src, dst)))
    cached = make_seq({0: list(range(5))})
    manager.allocate(cached)
    compute(manager, cached)
    manager.deallocate(cached)  # its first block stays in the prefix cache

    same_step: dict = {}
    first = make_seq({0: list(range(6)), 1: list(range(6))})
    manager.allocate(first, same_step)
    second = make_seq({0: list(range(6)), 1: list(range(5)) + [9]}, request=1)
    manager.allocate(second, same_step)
    (first0, first1), (twin, own) = first.tracks, second.tracks
    assert first0.twin is None and first0.num_cached_tokens == 4  # a prefix-cache hit
    assert twin.twin is first0 and twin.block_table == first0.block_table
    assert (twin.num_cached_tokens, twin.num_hashed_blocks, twin.last_hash) == (4, 1, first0.last_hash)
    assert all(manager.blocks[b].ref_count == 2 for b in first0.block_table)
    assert own.twin is None and not set(own.block_table) & set(first1.block_table)  # other tokens
    assert manager.num_free_blocks == 20 - 2 - 2 - 2

    full, partial = first0.block_table
    for seq in (first, second):
        compute(manager, seq)
        seq.append(7, 0.0, [0.0], [1.0])
        manager.append_slot(seq)
    # position 6 is in the shared partial block: the first to write gets a copy, the other keeps it
    assert copies == [(partial, first0.block_table[1])] and twin.block_table[:2] == [full, partial]
    manager.deallocate(first)
    manager.deallocate(second)
    assert twin.twin is None and manager.num_free_blocks == 20


def test_admission_cost_is_net_of_prefix_hits_and_twins_and_is_what_allocate_takes():
    """(tokens the largest track computes, blocks taken from the free set): a cached prefix computes only its
    rest, and takes free blocks only for the rest and for hits that were freed; a twin costs nothing."""
    manager = BlockManager(20, BS)
    prompt = list(range(9))  # 3 blocks; 2 full ones can hit (the last token is always computed)
    assert manager.admission_cost(make_seq({0: prompt, 1: prompt[:5]}), {}) == (9, 3 + 2)

    def cost_then_allocate(seq, same_step):
        free, cost = manager.num_free_blocks, manager.admission_cost(seq, same_step)
        manager.allocate(seq, same_step)
        assert free - manager.num_free_blocks == cost[1]
        assert cost[0] == max((0 if t.twin else seq.num_tokens(t) - t.num_cached_tokens) for t in seq.tracks)
        return cost

    first = make_seq({0: prompt})
    assert cost_then_allocate(first, {}) == (9, 3)
    compute(manager, first)
    same_step: dict = {}
    held = make_seq({0: prompt[:8] + [50]}, request=1)  # shares the 2 full blocks, held by `first`
    assert cost_then_allocate(held, same_step) == (1, 1)
    twin = make_seq({0: prompt[:8] + [50], 1: [3] * 6}, request=2)  # model 0 a twin of `held`
    assert cost_then_allocate(twin, same_step) == (6, 2)
    for seq in (first, held, twin):
        manager.deallocate(seq)
    freed = make_seq({0: prompt}, request=3)  # the hits are cached but free: taking them uses free blocks
    assert cost_then_allocate(freed, {}) == (1, 3)


def test_a_new_block_of_one_track_never_evicts_a_prefix_hit_of_another():
    """A sequence admitted with exactly its cost in free blocks, whose model-1 track hits a cached but free
    block X and then a block held by another sequence: if its model-0 track took X as a new block first,
    the model-1 track would lose both hits and find the pool empty."""
    manager = BlockManager(7, BS)
    system = [1, 2, 3, 4]
    same_step: dict = {}
    holder = make_seq({1: system + [2] * 4 + [9]})  # blocks 0 (system), 1 (held hit), 2
    other = make_seq({1: system + [1]}, request=1)  # blocks 3 (system again: X), 4
    spare = make_seq({0: [7] * 8}, request=2)  # blocks 5, 6
    for seq in (holder, other, spare):
        manager.allocate(seq, same_step)
    for seq in (holder, other, spare):  # `other` registers the system block last: the cache's entry is X
        compute(manager, seq)
    x, held = other.tracks[0].block_table[0], holder.tracks[0].block_table[1]
    manager.deallocate(other)  # free: 4, X
    keeper = make_seq({0: [8] * 3}, request=3)
    manager.allocate(keeper)  # takes 4
    manager.deallocate(spare)  # free: X, 6, 5
    late = make_seq({0: [6] * 3, 1: system + [2] * 4 + [5]}, request=4)
    assert manager.admission_cost(late, {}) == (3, 1 + 2)  # X is free: taking it costs a block
    manager.allocate(late)
    assert manager.num_free_blocks == 0 and late.tracks[1].num_cached_tokens == 8
    assert late.tracks[1].block_table[:2] == [x, held]


def test_forget_model_drops_only_that_models_cached_blocks():
    manager = BlockManager(20, BS)
    first = make_seq({0: list(range(10)), 1: list(range(10))})
    manager.allocate(first)
    compute(manager, first)
    manager.deallocate(first)
    manager.forget_model(1)
    again = make_seq({0: list(range(10)), 1: list(range(10))})
    manager.allocate(again)
    assert [t.num_cached_tokens for t in again.tracks] == [8, 0]


def test_prefix_cache_always_leaves_the_last_token_to_compute():
    manager = BlockManager(20, BS)
    first = make_seq({0: list(range(8))})
    manager.allocate(first)
    compute(manager, first)
    again = make_seq({0: list(range(8))})
    manager.allocate(again)
    assert again.tracks[0].num_cached_tokens == 4  # not 8: the logits of the last token are needed
    assert again.tracks[0].block_table[0] == first.tracks[0].block_table[0]
    assert again.tracks[0].block_table[1] != first.tracks[0].block_table[1]


def test_uncomputed_blocks_are_not_hits_and_freed_blocks_stay_cached_until_reused():
    manager = BlockManager(4, BS)
    first = make_seq({0: list(range(9))})
    manager.allocate(first)
    pending = make_seq({0: list(range(9))})
    assert manager.admission_cost(pending, {}) == (9, 3)  # `first` is not computed: no hit
    manager.deallocate(first)  # never computed: nothing was registered
    manager.allocate(pending)
    assert pending.tracks[0].num_cached_tokens == 0
    compute(manager, pending)
    cached = list(pending.tracks[0].block_table)
    manager.deallocate(pending)
    assert manager.num_free_blocks == 4

    revived = make_seq({0: list(range(9))})
    manager.allocate(revived)
    assert revived.tracks[0].num_cached_tokens == 8
    assert revived.tracks[0].block_table[:2] == cached[:2]
    assert manager.num_free_blocks == 1
    manager.deallocate(revived)

    # blocks handed out for other content lose their registration
    filler = make_seq({0: [7] * 16})
    manager.allocate(filler)
    manager.deallocate(filler)
    again = make_seq({0: list(range(9))})
    manager.allocate(again)
    assert again.tracks[0].num_cached_tokens == 0


def test_decode_blocks_are_registered_when_they_fill_up():
    manager = BlockManager(10, BS)
    seq = make_seq({0: [1, 2, 3]})
    manager.allocate(seq)
    compute(manager, seq)
    for token in (4, 5):
        seq.append(token, 0.0, [0.0], [1.0])
        manager.append_slot(seq)
        compute(manager, seq)
    other = make_seq({0: [1, 2, 3, 4, 5]})
    manager.allocate(other)
    assert other.tracks[0].num_cached_tokens == 4
    assert other.tracks[0].block_table[0] == seq.tracks[0].block_table[0]


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0)])
def test_bad_sizes_are_rejected(num_blocks, block_size):
    with pytest.raises(ValueError, match="num_blocks" if num_blocks == 0 else "block_size"):
        BlockManager(num_blocks, block_size)
