"""Continuous batching: each step runs every running sequence's next tokens plus as many waiting
prompts (or prompt chunks) as the token budget, the sequence limit and the KV cache allow."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvserve.core.config import EngineConfig
from kvserve.core.engine.block_manager import BlockManager
from kvserve.core.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """Sequences to run this step, decodes first, and how many new tokens each computes."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_decodes: int


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        self.chunked_prefill = config.scheduler.enable_chunked_prefill
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        decodes = [s for s in self.running if s.is_decoding]
        prefills = [s for s in self.running if not s.is_decoding]
        seqs, counts = [], []
        for seq in decodes:
            seqs.append(seq)
            counts.append(1)
        budget -= len(decodes)
        for seq in prefills:
            if budget == 0:
                break
            n = min(seq.num_prompt_tokens - seq.num_computed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_prompt_tokens, budget)
            if (n < seq.num_prompt_tokens and not self.chunked_prefill) or not self.block_manager.can_admit(seq):
                break
            self.waiting.popleft()
            self.block_manager.admit(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        for seq, n in zip(seqs, counts):
            self.block_manager.ensure_slots(seq, seq.num_computed_tokens + n)
        return ScheduledBatch(seqs, counts, len(decodes))

    def finish_step(self, batch: ScheduledBatch) -> None:
        """Record the computed tokens; free finished sequences at once."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        for seq in batch.seqs:
            if seq.is_finished:
                self.block_manager.free(seq)
        self.running = [s for s in self.running if not s.is_finished]

    def abort(self, request_id: str) -> None:
        """Drop every sequence of a request, waiting or running, and free its blocks."""
        for seq in [s for s in self.waiting if s.request_id == request_id]:
            seq.finish("abort")
            self.waiting.remove(seq)
        for seq in [s for s in self.running if s.request_id == request_id]:
            seq.finish("abort")
            self.block_manager.free(seq)
            self.running.remove(seq)
