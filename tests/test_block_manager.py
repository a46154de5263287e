"""The block manager on its own: reservations, lazy allocation, and every block back after any mix."""
from __future__ import annotations

import random

from kvserve.core.engine.block_manager import BlockManager
from kvserve.core.engine.sequence import Sequence
from kvserve.core.sampling_params import SamplingParams


def make_seq(prompt_len: int, max_tokens: int, max_model_len: int = 256) -> Sequence:
    return Sequence("r", [1] * prompt_len, SamplingParams(max_tokens=max_tokens), max_model_len, [2])


def test_admission_reserves_whole_length_and_allocates_lazily():
    manager = BlockManager(num_blocks=10, block_size=16)
    seq = make_seq(20, 40)                 # 60 tokens -> 4 blocks promised
    assert manager.can_admit(seq)
    manager.admit(seq)
    assert manager.num_reserved == 4 and manager.num_free_blocks == 10
    manager.ensure_slots(seq, 20)
    assert len(seq.block_table) == 2 and manager.num_reserved == 2 and manager.num_free_blocks == 8
    big = make_seq(60, 60)                 # 120 tokens -> 8 blocks: more than the 6 left unpromised
    assert not manager.can_admit(big)
    manager.free(seq)
    assert manager.can_admit(big) and manager.num_reserved == 0 and manager.num_free_blocks == 10


def test_random_mix_returns_every_block():
    rng = random.Random(0)
    manager = BlockManager(num_blocks=64, block_size=16)
    live: list[tuple[Sequence, int]] = []
    for _ in range(2000):
        if live and rng.random() < 0.4:
            seq, _ = live.pop(rng.randrange(len(live)))
            manager.free(seq)
            continue
        if live and rng.random() < 0.5:
            i = rng.randrange(len(live))
            seq, computed = live[i]
            computed = min(seq.max_total_tokens, computed + rng.randrange(1, 40))
            manager.ensure_slots(seq, computed)
            live[i] = (seq, computed)
        else:
            seq = make_seq(rng.randrange(1, 100), rng.randrange(1, 100))
            if manager.can_admit(seq):
                manager.admit(seq)
                live.append((seq, 0))
        held = [b for s, _ in live for b in s.block_table]
        assert len(held) == len(set(held))
        assert manager.num_free_blocks + len(held) == 64
        assert manager.num_reserved <= manager.num_free_blocks
    for seq, _ in live:
        manager.free(seq)
    assert sorted(manager.free_block_ids) == list(range(64))
    assert manager.num_reserved == 0 and not any(manager.ref_counts)
