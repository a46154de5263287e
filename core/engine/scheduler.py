"""Continuous batching with chunked prefill and preemption.

Each step, running sequences get their next tokens first (oldest first, within the token budget), then
swapped-out ones come back, then waiting ones are admitted while the budget, the sequence limit and the KV cache
allow. When a running sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are copied to host memory (preemption_mode="swap", while host blocks last) or freed, to
be recomputed (cheaply, from the prefix cache) later.

With pipeline stages several steps are in flight at once: a sequence in one is neither scheduled again nor
preempted until it has finished, and each step takes its share of the sequences that can run, so that the
steps still to be submitted get theirs.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvserve.core.config import EngineConfig
from kvserve.core.engine.block_manager import BlockManager
from kvserve.core.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from kvserve.core.structured_outputs.manager import GrammarBitmask


@dataclass
class ScheduledBatch:
    """Sequences to run this step (decodes of one new token first, then those verifying proposals, then prefill
    chunks), how many new tokens each computes, and the block copies to make before it runs: swap-outs first,
    since their blocks may be reused."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_decodes: int
    swap_outs: list[tuple[int, int]]      # (device block, host block)
    block_copies: list[tuple[int, int]]   # (source, destination) device blocks, for copy on write
    swap_ins: list[tuple[int, int]]       # (host block, device block)
    grammar: GrammarBitmask | None = None   # the engine's: the tokens its constrained sequences may sample


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        self.chunked_prefill = config.scheduler.enable_chunked_prefill
        self.swap = config.cache.preemption_mode == "swap"
        self.max_loras = config.lora.max_loras if config.lora.enable_lora else None
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # in admission order
        self.swapped: deque[Sequence] = deque()
        self.swapped_this_step: list[Sequence] = []
        self.in_flight: set[Sequence] = set()   # in a step submitted and not yet finished
        self.share = 0   # how many sequences this step may take
        self.num_preemptions = 0
        self.num_swap_outs = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self, steps_to_submit: int = 1) -> ScheduledBatch:
        """The next step, ``steps_to_submit`` (this one included) sharing the sequences that can run."""
        manager = self.block_manager
        manager.named_this_step, manager.copies_this_step = [], []
        manager.swap_outs_this_step, manager.swap_ins_this_step, self.swapped_this_step = [], [], []
        idle = sum(1 for s in self.running if s not in self.in_flight and s.num_uncomputed_tokens)
        self.share = -(-(idle + len(self.waiting) + len(self.swapped)) // steps_to_submit)
        batch = self._schedule()
        self.in_flight.update(batch.seqs)
        return batch

    def _schedule(self) -> ScheduledBatch:
        manager = self.block_manager
        scheduled: dict[Sequence, int] = {}
        budget, preempted = self._schedule_running(scheduled)
        num_seqs = sum(s.num_seqs for s in self.running)
        loras = None if self.max_loras is None else {s.lora_id for s in self.running if s.lora_id}
        # A swapped beam that has reported waits for its search to decide, like a running one.
        resumable = [s for s in self.swapped if s.num_uncomputed_tokens]
        for seq in resumable if not preempted else ():
            n = min(seq.num_uncomputed_tokens, budget)
            if (n == 0 or len(scheduled) == self.share or num_seqs + seq.num_seqs > self.max_num_seqs
                    or not self._lora_fits(seq, loras) or not manager.swap_in(seq, n)):
                break
            self.swapped.remove(seq)
            self._start(seq, n, scheduled, loras)
            num_seqs += seq.num_seqs
            budget -= n
        # Waiting sequences start only once every swapped one that can go on has.
        blocked = preempted or any(s.num_uncomputed_tokens for s in self.swapped)
        skipped: list[Sequence] = []   # waiting ones whose adapter would be one too many: they keep their place
        while self.waiting and budget > 0 and len(scheduled) < self.share and not blocked:
            seq = self.waiting[0]
            if not self._lora_fits(seq, loras):
                skipped.append(self.waiting.popleft())
                continue
            if num_seqs + seq.num_seqs > self.max_num_seqs:
                break
            n = manager.try_admit(seq, budget, self.chunked_prefill)
            if n == 0:
                break
            self.waiting.popleft()
            self._start(seq, n, scheduled, loras)
            num_seqs += seq.num_seqs
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        paused = [s for s in self.running if not s.num_uncomputed_tokens] if not scheduled else []
        if paused and (self.waiting or self.swapped):
            # Beams waiting for their search hold blocks that the sequences it waits for need: give those up.
            self.running.remove(paused[-1])
            self._preempt(paused[-1])
            return self._schedule()
        decodes = [s for s, n in scheduled.items() if n == 1]
        chunks = [s for s, n in scheduled.items() if n > 1 and not s.proposal]
        order = decodes + [s for s in scheduled if s.proposal] + chunks
        return ScheduledBatch(order, [scheduled[s] for s in order], len(decodes), manager.swap_outs_this_step,
                              manager.copies_this_step, manager.swap_ins_this_step)

    def _schedule_running(self, scheduled: dict[Sequence, int]) -> tuple[int, bool]:
        """The running sequences' next tokens, preempting the newest when blocks run out; returns the budget
        left and whether anything was preempted."""
        budget, preempted = self.max_num_batched_tokens, False
        for seq in list(self.running):
            if budget == 0 or len(scheduled) == self.share:
                break
            # Skip sequences preempted earlier in this loop, beams waiting for their siblings' reports, and
            # sequences in a step in flight.
            if (seq.status is not SequenceStatus.RUNNING or not seq.num_uncomputed_tokens
                    or seq in self.in_flight):
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, n):
                victim = next(s for s in reversed(self.running) if s not in self.in_flight)   # seq, at least
                self.running.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.block_manager.commit(seq, seq.num_computed_tokens + n)
                scheduled[seq] = n
                budget -= n
        # Proposals take only the budget and free blocks left once every running sequence has its own tokens.
        for seq in (s for s in self.running if s not in self.in_flight):
            seq.proposal = seq.proposal[:budget] if seq in scheduled else []
            if seq.proposal and self.block_manager.allocate_slots(seq, scheduled[seq] + len(seq.proposal)):
                scheduled[seq] += len(seq.proposal)
                budget -= len(seq.proposal)
            else:
                seq.proposal = []
        return budget, preempted

    def _lora_fits(self, seq: Sequence, loras: set[int] | None) -> bool:
        """Whether ``seq`` may run beside the running sequences, whose adapters are ``loras``, without a step
        running more than max_loras adapters (None: LoRA is off)."""
        return loras is None or not seq.lora_id or seq.lora_id in loras or len(loras) < self.max_loras

    def _start(self, seq: Sequence, n: int, scheduled: dict[Sequence, int], loras: set[int] | None) -> None:
        if loras is not None and seq.lora_id:
            loras.add(seq.lora_id)
        self.block_manager.commit(seq, seq.num_computed_tokens + n)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        scheduled[seq] = n

    def _preempt(self, seq: Sequence) -> None:
        # A beam that has reported is not needed until its search decides: the sequences it waits for go first.
        waits_for_siblings = not seq.num_uncomputed_tokens
        seq.proposal, seq.draft_computed = [], 0   # a draft model's cache is neither swapped nor kept
        self.num_preemptions += 1
        if self.swap and self.block_manager.swap_out(seq):
            seq.status, queue = SequenceStatus.SWAPPED, self.swapped
            self.swapped_this_step.append(seq)
            self.num_swap_outs += 1
        else:
            self.block_manager.free(seq)
            seq.num_computed_tokens, seq.status, queue = 0, SequenceStatus.WAITING, self.waiting
        if waits_for_siblings:
            queue.append(seq)
        else:
            queue.appendleft(seq)

    def forget_swaps(self) -> None:
        """The step failed before its swap-outs were surely copied: recompute those sequences instead."""
        for seq in self.swapped_this_step:
            if seq.status is SequenceStatus.SWAPPED:
                self.swapped.remove(seq)
                self.block_manager.release_host_blocks(seq)
                seq.num_computed_tokens, seq.block_hashes, seq.status = 0, [], SequenceStatus.WAITING
                self.waiting.appendleft(seq)
        self.swapped_this_step = []

    def finish_step(self, batch: ScheduledBatch, accepted: dict[Sequence, int]) -> None:
        """Record the computed tokens (of a speculating sequence's proposal, the ``accepted`` ones), fork the
        siblings of sequences that sampled their first token, free finished sequences at once, and the others'
        blocks that fell out of the sliding window."""
        self.in_flight.difference_update(batch.seqs)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n - len(seq.proposal) + accepted.get(seq, 0)
            if seq.proposal:
                seq.proposal = []
                seq.draft_computed = min(seq.draft_computed, seq.num_computed_tokens)   # the rejected ones' go
                self.block_manager.trim(seq)
            if seq.pending_forks and seq.num_computed_tokens == seq.num_prompt_tokens:
                for child in seq.pending_forks:
                    if not child.is_finished:
                        self.fork(seq, child)
                seq.pending_forks = []
            if seq.is_finished:
                self.block_manager.free(seq)
            else:
                self.block_manager.free_out_of_window(seq)
        self.running = [s for s in self.running if not s.is_finished]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Schedule ``child`` beside ``parent``: running on its computed blocks, or, if ``parent`` was preempted,
        waiting to be recomputed."""
        if parent.status is not SequenceStatus.RUNNING:
            child.num_computed_tokens, child.block_hashes, child.status = 0, [], SequenceStatus.WAITING
            self.waiting.appendleft(child)
            return
        self.block_manager.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the schedule for good (a beam that lost, an aborted one), freeing its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status is SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
            self.block_manager.release_host_blocks(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.in_flight.discard(seq)
        seq.status = SequenceStatus.FINISHED

    def abort(self, request_id: str) -> None:
        """Drop every sequence of a request, wherever it is, and free its blocks."""
        for queue in (self.waiting, self.running, self.swapped):
            for seq in [s for s in queue if s.request_id == request_id]:
                for child in seq.pending_forks:
                    child.finish("abort")
                self.remove(seq)
                seq.finish("abort")
