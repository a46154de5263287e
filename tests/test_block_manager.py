"""The block manager on its own: lazy allocation, prefix caching, LRU eviction, and its invariants."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.core.engine.block_manager import BlockManager
from kvserve.core.engine.sequence import Sequence
from kvserve.core.sampling_params import SamplingParams

BLOCK = 4


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams(max_tokens=64), 1024, [2])


class ShadowCache:
    """The token each cache slot would hold, written as the model runner writes keys and values (after the
    step's swaps and block copies), to check that every sequence reads back exactly its own tokens."""

    def __init__(self, manager: BlockManager):
        self.manager = manager
        self.slots: dict[tuple[str, int, int], int] = {}     # (device or host, block, offset) -> token

    def apply_copies(self) -> None:
        manager = self.manager
        for pairs, source, destination in ((manager.swap_outs_this_step, "device", "host"),
                                           (manager.copies_this_step, "device", "device"),
                                           (manager.swap_ins_this_step, "host", "device")):
            for src, dst in pairs:
                for offset in range(BLOCK):
                    if (source, src, offset) in self.slots:
                        self.slots[(destination, dst, offset)] = self.slots[(source, src, offset)]
            pairs.clear()

    def write(self, seq: Sequence, n: int) -> None:
        """Run n new tokens of ``seq``, whose slots the manager has just allocated."""
        self.apply_copies()
        for position in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block = seq.block_table[position // BLOCK]
            assert self.manager.ref_counts[block] == 1, "a block is written while another sequence holds it"
            self.slots[("device", block, position % BLOCK)] = seq.token_ids[position]
        seq.num_computed_tokens += n
        self.manager.commit(seq, seq.num_computed_tokens)

    def read(self, seq: Sequence) -> list[int]:
        where, table = ("host", seq.host_blocks) if seq.host_blocks else ("device", seq.block_table)
        return [self.slots.get((where, table[p // BLOCK], p % BLOCK)) for p in range(seq.num_computed_tokens)]


def compute(manager: BlockManager, seq: Sequence, n: int, cache: ShadowCache | None = None) -> bool:
    """What the scheduler and model runner do for n new tokens of a running sequence."""
    if not manager.allocate_slots(seq, n):
        return False
    (cache or ShadowCache(manager)).write(seq, n)
    return True


def check_invariants(manager: BlockManager, live: list[Sequence]) -> None:
    held = [b for s in live for b in s.block_table]
    for block in range(manager.num_blocks):
        assert manager.ref_counts[block] == held.count(block)
        assert (block in manager.free_blocks) == (manager.ref_counts[block] == 0)
    for block_hash, block in manager.cached.items():
        assert manager.block_hash[block] == block_hash
    for seq in live:
        assert len(seq.block_table) == manager.blocks_for(seq.num_computed_tokens)
        parent = None
        for i, block_hash in enumerate(seq.block_hashes):
            parent = hash((parent, tuple(seq.token_ids[i * BLOCK:(i + 1) * BLOCK])))
            assert block_hash == parent
        assert len(seq.block_hashes) == seq.num_computed_tokens // BLOCK


def test_prefix_hit_reuses_blocks_and_leaves_one_token():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    first = make_seq(list(range(10)))
    assert manager.try_admit(first, budget=100, allow_partial=True) == 10
    first.num_computed_tokens = 10
    manager.commit(first, first.num_computed_tokens)                              # blocks 0-3, 4-7 are full and named
    manager.free(first)
    assert manager.num_free_blocks == 8 and len(manager.cached) == 2
    second = make_seq(list(range(8)) + [42, 43])
    assert manager.try_admit(second, budget=100, allow_partial=True) == 2
    assert second.block_table[:2] == first_blocks(manager, 2) and second.num_computed_tokens == 8
    whole = make_seq(list(range(8)))                   # fully cached: the last token is computed again
    assert manager.try_admit(whole, budget=100, allow_partial=True) == 4
    assert manager.prefix_hits == 8 + 4 and manager.prefix_queries == 10 + 10 + 8


def first_blocks(manager: BlockManager, count: int) -> list[int]:
    return [block for _, block in list(manager.cached.items())[:count]]


def test_eviction_is_least_recently_freed_first():
    manager = BlockManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    a, b = make_seq([1] * 8), make_seq([2] * 8)
    for seq in (a, b):
        assert compute_admitted(manager, seq)
    manager.free(a)
    manager.free(b)
    c = make_seq([3] * 5)                              # needs 2 blocks: a's, freed first, are evicted
    assert manager.try_admit(c, budget=100, allow_partial=True) == 5
    manager.free(c)
    for tokens, cached in (([2] * 8 + [9], 8), ([1] * 8 + [9], 0)):
        probe = make_seq(tokens)
        assert manager.try_admit(probe, budget=100, allow_partial=True) == 9 - cached
        assert probe.num_computed_tokens == cached
        manager.free(probe)


def compute_admitted(manager: BlockManager, seq: Sequence) -> bool:
    n = manager.try_admit(seq, budget=100, allow_partial=True)
    seq.num_computed_tokens += n
    manager.commit(seq, seq.num_computed_tokens)
    return n > 0


def test_without_prefix_caching_nothing_is_shared():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    compute_admitted(manager, a)
    manager.free(a)
    b = make_seq(list(range(9)))
    assert manager.try_admit(b, budget=100, allow_partial=True) == 9 and not manager.cached


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "compute", "fork", "free", "swap-out", "swap-in"]),
                          st.integers(0, 1000), st.lists(st.integers(0, 2), min_size=1, max_size=14)), max_size=60))
def test_random_operations_keep_invariants(operations):
    manager = BlockManager(num_blocks=12, block_size=BLOCK, enable_prefix_caching=True, num_host_blocks=6)
    cache = ShadowCache(manager)
    live: list[Sequence] = []
    swapped: list[Sequence] = []
    for op, pick, tokens in operations:
        if op == "admit":
            seq = make_seq(tokens)      # a 3-token alphabet makes shared prefixes common
            n = manager.try_admit(seq, budget=1 + pick % 16, allow_partial=pick % 2 == 0)
            if n:
                cache.write(seq, n)
                live.append(seq)
            else:
                assert not seq.block_table
        elif op == "compute" and live:
            seq = live[pick % len(live)]
            seq.token_ids += tokens[:1 + pick % 3]
            if seq.num_uncomputed_tokens:
                compute(manager, seq, seq.num_uncomputed_tokens, cache)
        elif op == "fork" and live:
            parent = live[pick % len(live)]
            child = make_seq(parent.token_ids[:parent.num_computed_tokens])
            manager.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            live.append(child)
        elif op == "free" and live:
            manager.free(live.pop(pick % len(live)))
        elif op == "swap-out" and live:
            seq = live[pick % len(live)]
            if manager.swap_out(seq):
                cache.apply_copies()
                live.remove(seq)
                swapped.append(seq)
        elif op == "swap-in" and swapped:
            seq = swapped[pick % len(swapped)]
            seq.token_ids += tokens[:pick % 2]
            if manager.swap_in(seq, seq.num_uncomputed_tokens):
                cache.write(seq, seq.num_uncomputed_tokens)
                swapped.remove(seq)
                live.append(seq)
        check_invariants(manager, live)
        host = [b for s in swapped for b in s.host_blocks] + list(manager.free_host_blocks)
        assert sorted(host) == list(range(6)) and all(not s.block_table for s in swapped)
        for seq in live + swapped:
            assert cache.read(seq) == seq.token_ids[:seq.num_computed_tokens]
    for seq in live:
        manager.free(seq)
    for seq in swapped:
        manager.release_host_blocks(seq)
    check_invariants(manager, [])
    assert manager.num_free_blocks == manager.num_blocks and len(manager.free_host_blocks) == 6


def test_forked_sequences_copy_a_shared_partial_block_on_write():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    cache = ShadowCache(manager)
    parent = make_seq(list(range(6)))                  # one full block and half of another
    cache.write(parent, manager.try_admit(parent, budget=100, allow_partial=True))
    children = [make_seq(parent.token_ids) for _ in range(2)]
    for child in children:
        manager.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
    assert [manager.ref_counts[b] for b in parent.block_table] == [3, 3] and manager.num_free_blocks == 6
    full, partial = parent.block_table
    for i, seq in enumerate([parent, *children]):
        seq.token_ids.append(100 + i)
        assert compute(manager, seq, 1, cache)
    assert all(s.block_table[0] == full for s in children) and manager.ref_counts[full] == 3
    assert len({s.block_table[1] for s in [parent, *children]}) == 3   # two copies; the last writer kept it
    assert children[-1].block_table[1] == partial
    for seq in [parent, *children]:
        assert cache.read(seq) == seq.token_ids
