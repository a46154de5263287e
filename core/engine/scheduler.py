"""Continuous batching with chunked prefill and preemption.

Each step, running sequences get their next tokens first (oldest first, within the token budget), then
waiting ones are admitted while the budget, the sequence limit and the KV cache allow. When a running
sequence needs a block and none is free, the most recently admitted sequence is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed (cheaply, from the prefix cache) later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvserve.core.config import EngineConfig
from kvserve.core.engine.block_manager import BlockManager
from kvserve.core.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """Sequences to run this step, decodes (one new token) first, and how many new tokens each computes."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_decodes: int
    block_copies: list[tuple[int, int]]   # (source, destination) blocks to copy before the step runs


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        self.chunked_prefill = config.scheduler.enable_chunked_prefill
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        self.block_manager.named_this_step, self.block_manager.copies_this_step = [], []
        budget = self.max_num_batched_tokens
        scheduled: dict[Sequence, int] = {}
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:   # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.block_manager.commit(seq, seq.num_computed_tokens + n)
                scheduled[seq] = n
                budget -= n
        num_seqs = sum(s.num_seqs for s in self.running)
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if num_seqs + seq.num_seqs > self.max_num_seqs:
                break
            n = self.block_manager.try_admit(seq, budget, self.chunked_prefill)
            if n == 0:
                break
            self.block_manager.commit(seq, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_seqs += seq.num_seqs
            scheduled[seq] = n
            budget -= n
        decodes = [s for s, n in scheduled.items() if n == 1]
        others = [s for s, n in scheduled.items() if n > 1]
        order = decodes + others
        return ScheduledBatch(order, [scheduled[s] for s in order], len(decodes), self.block_manager.copies_this_step)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish_step(self, batch: ScheduledBatch) -> None:
        """Record the computed tokens, fork the siblings of sequences that sampled their first token, and free
        finished sequences at once."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.pending_forks and seq.num_computed_tokens == seq.num_prompt_tokens:
                for child in seq.pending_forks:
                    if not child.is_finished:
                        self.fork(seq, child)
                seq.pending_forks = []
            if seq.is_finished:
                self.block_manager.free(seq)
        self.running = [s for s in self.running if not s.is_finished]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run ``child`` (its own tokens already added) on ``parent``'s computed blocks, beside it."""
        self.block_manager.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def abort(self, request_id: str) -> None:
        """Drop every sequence of a request, waiting or running, and free its blocks."""
        for seq in [s for s in self.waiting if s.request_id == request_id]:
            self._abort(seq)
            self.waiting.remove(seq)
        for seq in [s for s in self.running if s.request_id == request_id]:
            self._abort(seq)
            self.block_manager.free(seq)
            self.running.remove(seq)

    @staticmethod
    def _abort(seq: Sequence) -> None:
        for child in seq.pending_forks:
            child.finish("abort")
        seq.finish("abort")
