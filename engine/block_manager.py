"""Paging of the KV pool: block tables per (sequence, model), ref counts, prefix cache, fork, COW."""

from __future__ import annotations

from collections.abc import Callable

from mope.engine.sequence import Sequence, Track


def chain_hash(prev_hash: int, model: int, token_ids: list[int]) -> int:
    """Hash of a full block given the hash of the block before it; the model is part of the key, so
    blocks of different models are never shared."""
    return hash((prev_hash, model, tuple(token_ids)))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "key")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.key: tuple | None = None  # (prev_hash, model, tokens), checked on a hit: collisions are harmless


class BlockManager:
    """Hands out the pool's blocks to the tracks of sequences.

    A full block whose KV has been computed is registered under its chained hash; a later track whose
    prompt starts with the same tokens (for the same model) reuses it instead of recomputing it. Freed
    blocks keep their registration until they are handed out again. `copy_block(src, dst)` copies a
    block's KV in the pool (copy-on-write).
    """

    def __init__(self, num_blocks: int, block_size: int,
                 copy_block: Callable[[int, int], None] | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids = dict.fromkeys(range(num_blocks))  # an insertion-ordered set, oldest first
        self.hash_to_block: dict[int, int] = {}
        self.copy_block = copy_block

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take(self, block_id: int | None = None) -> int:
        """Reference a block: a given one (a prefix-cache hit) or the oldest free one."""
        if block_id is None:
            block_id = next(iter(self.free_block_ids))
            block = self.blocks[block_id]
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.key = -1, None
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None

    def admission_cost(self, seq: Sequence, same_step: dict[tuple, Track]) -> tuple[int, int]:
        """What allocating a waiting sequence now would cost: (tokens its largest track computes, blocks it
        takes from the free set), net of prefix-cache hits and of twins among `same_step` (see `allocate`)."""
        tokens = blocks = 0
        for track in seq.tracks:
            num_tokens = seq.num_tokens(track)
            if _twin_key(seq, track) in same_step:
                continue  # shares its twin's blocks, computes nothing
            hits, _ = self._cached_prefix(seq, track)
            tokens = max(tokens, num_tokens - len(hits) * self.block_size)
            blocks += (-(-num_tokens // self.block_size) - len(hits)
                       + sum(self.blocks[block_id].ref_count == 0 for block_id in hits))  # cached but free
        return tokens, blocks

    def _cached_prefix(self, seq: Sequence, track: Track) -> tuple[list[int], int]:
        """The cached blocks of the track's longest computed prefix (at least its last token left to compute)
        and the chained hash of the last of them (-1 for none)."""
        num_tokens, prev_hash, hits = seq.num_tokens(track), -1, []
        while (len(hits) + 1) * self.block_size < num_tokens:
            tokens = seq.token_ids(track, len(hits) * self.block_size, (len(hits) + 1) * self.block_size)
            h = chain_hash(prev_hash, track.model, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].key != (prev_hash, track.model, tuple(tokens)):
                break
            hits.append(block_id)
            prev_hash = h
        return hits, prev_hash

    def allocate(self, seq: Sequence, same_step: dict[tuple, Track] | None = None) -> None:
        """Give every track of a waiting sequence the blocks of all its tokens, reusing cached full blocks of
        its longest cached prefix (at least the last token is always left to compute, for its logits).

        `same_step`: the tracks allocated before in the same prefill step, by (model, tokens); a track with
        the same key becomes their twin (shares all their blocks, computes nothing), else it is added.
        """
        same_step = {} if same_step is None else same_step
        for track in seq.tracks:  # every track's shared blocks first: no new block may evict another's hit
            assert not track.block_table
            twin = same_step.setdefault(_twin_key(seq, track), track)
            track.twin = None if twin is track else twin
            if track.twin is not None:
                track.block_table = [self._take(block_id) for block_id in twin.block_table]
                track.num_cached_tokens = twin.num_cached_tokens
                track.num_hashed_blocks, track.last_hash = twin.num_hashed_blocks, twin.last_hash
                continue
            hits, prev_hash = self._cached_prefix(seq, track)
            track.block_table = [self._take(block_id) for block_id in hits]
            track.num_cached_tokens = len(hits) * self.block_size
            track.num_hashed_blocks, track.last_hash = len(hits), prev_hash
        for track in seq.tracks:
            num_blocks = -(-seq.num_tokens(track) // self.block_size)
            track.block_table.extend(self._take() for _ in range(num_blocks - len(track.block_table)))

    def deallocate(self, seq: Sequence) -> None:
        """Drop all of a sequence's block references (finished or preempted)."""
        for track in seq.tracks:
            for block_id in reversed(track.block_table):
                self._release(block_id)
            track.block_table.clear()
            track.num_cached_tokens = track.num_hashed_blocks = 0
            track.last_hash, track.twin = -1, None

    def _needs_block(self, seq: Sequence, track: Track) -> bool:
        """Whether writing the track's newest token takes a block (a new one, or a copy of a shared one)."""
        index = (seq.num_tokens(track) - 1) // self.block_size
        return index == len(track.block_table) or self.blocks[track.block_table[index]].ref_count > 1

    def can_append(self, seq: Sequence) -> bool:
        return sum(self._needs_block(seq, track) for track in seq.tracks) <= self.num_free_blocks

    def append_slot(self, seq: Sequence) -> None:
        """Make room for a running sequence's newest token in every track (copy-on-write of shared blocks)."""
        for track in seq.tracks:
            index = (seq.num_tokens(track) - 1) // self.block_size
            if index == len(track.block_table):
                track.block_table.append(self._take())
            elif self.blocks[track.block_table[index]].ref_count > 1:
                shared = track.block_table[index]
                track.block_table[index] = self._take()
                if self.copy_block is not None:
                    self.copy_block(shared, track.block_table[index])
                self._release(shared)

    def forget_model(self, model: int) -> None:
        """Unregister every cached block of `model` (its weights changed, so its cached KV is stale)."""
        for block in self.blocks:
            if block.key is not None and block.key[1] == model:
                if self.hash_to_block.get(block.hash) == block.block_id:
                    del self.hash_to_block[block.hash]
                block.hash, block.key = -1, None

    def fork(self, child: Sequence) -> None:
        """Add the references of a forked sequence, whose tracks already list its parent's blocks."""
        for track in child.tracks:
            for block_id in track.block_table:
                self.blocks[block_id].ref_count += 1

    def register_computed(self, seq: Sequence) -> None:
        """Enter the sequence's newly computed full blocks into the prefix cache."""
        for track in seq.tracks:
            while (track.num_hashed_blocks + 1) * self.block_size <= track.num_cached_tokens:
                start = track.num_hashed_blocks * self.block_size
                tokens = seq.token_ids(track, start, start + self.block_size)
                h = chain_hash(track.last_hash, track.model, tokens)
                block = self.blocks[track.block_table[track.num_hashed_blocks]]
                if block.hash != h:  # a block shared with a fork or a cache hit is already registered
                    block.hash, block.key = h, (track.last_hash, track.model, tuple(tokens))
                    self.hash_to_block[h] = block.block_id
                track.num_hashed_blocks, track.last_hash = track.num_hashed_blocks + 1, h


def _twin_key(seq: Sequence, track: Track) -> tuple:
    """What a track shares with its twins in one prefill step: the model and every token."""
    return track.model, tuple(seq.token_ids(track, 0, seq.num_tokens(track)))
