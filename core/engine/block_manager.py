"""Paged KV cache bookkeeping: integer block ids, a free list, reference counts, reservations.

A sequence is admitted only when blocks for its whole possible length (prompt plus max_tokens,
capped at max_model_len) can be promised to it. Blocks are handed out lazily as tokens are
computed, but a running sequence can never run out, so nothing has to be evicted or dropped.
"""
from __future__ import annotations

from collections import deque

from kvserve.core.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.num_reserved = 0      # blocks promised to admitted sequences but not yet handed out

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def can_admit(self, seq: Sequence) -> bool:
        return self.blocks_for(seq.max_total_tokens) <= self.num_free_blocks - self.num_reserved

    def admit(self, seq: Sequence) -> None:
        assert self.can_admit(seq) and not seq.block_table
        seq.num_reserved_blocks = self.blocks_for(seq.max_total_tokens)
        self.num_reserved += seq.num_reserved_blocks

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` enough blocks to hold ``num_tokens`` tokens, out of its reservation."""
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        assert missing <= seq.num_reserved_blocks, "a sequence outgrew its reservation"
        for _ in range(missing):
            block_id = self.free_block_ids.popleft()
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)
        seq.num_reserved_blocks -= max(missing, 0)
        self.num_reserved -= max(missing, 0)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table = []
        self.num_reserved -= seq.num_reserved_blocks
        seq.num_reserved_blocks = 0
