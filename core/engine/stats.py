"""A snapshot of an engine's queues and counters, as /metrics and the benchmarks read them: of one LLMEngine, or
summed over a data-parallel engine's replicas."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields


@dataclass
class EngineStats:
    running: int = 0                # requests with a sequence running
    waiting: int = 0                # requests waiting for admission
    swapped: int = 0                # requests preempted with their KV blocks in host memory
    num_blocks: int = 0
    num_free_blocks: int = 0
    prompt_tokens: int = 0          # prompt tokens computed (prefill)
    generation_tokens: int = 0
    num_preemptions: int = 0
    num_swap_outs: int = 0
    prefix_queries: int = 0         # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0
    spec_verifications: int = 0
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_position: Counter = field(default_factory=Counter)

    @classmethod
    def of(cls, engine) -> EngineStats:
        """Read an LLMEngine's scheduler, block manager and counters."""
        # The scheduler holds sequences (n > 1 gives a request several): count the requests they belong to,
        # a request with any sequence running being running.
        scheduler, blocks = engine.scheduler, engine.block_manager
        running = {seq.request_id for seq in list(scheduler.running)}
        swapped = {seq.request_id for seq in list(scheduler.swapped)} - running
        waiting = {seq.request_id for seq in list(scheduler.waiting)} - running - swapped
        return cls(len(running), len(waiting), len(swapped), blocks.num_blocks, blocks.num_free_blocks,
                   engine.prompt_tokens_total, engine.generation_tokens_total, scheduler.num_preemptions,
                   scheduler.num_swap_outs, blocks.prefix_queries, blocks.prefix_hits, engine.spec_verifications,
                   engine.spec_proposed_tokens, engine.spec_accepted_tokens,
                   Counter(engine.spec_accepted_per_position))

    def __add__(self, other: EngineStats) -> EngineStats:
        return EngineStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def engine_stats(engine) -> EngineStats:
    """The stats of an LLMEngine, or of an engine that keeps its own (a DataParallelEngine's ``stats()``)."""
    own = getattr(engine, "stats", None)
    return own() if own is not None else EngineStats.of(engine)
