"""Split model replicas: the engine's process is rank 0 and starts every other rank (ranks.py); each builds its
share of the model (its stage's layers, its shard of them) and of the KV cache, and makes the model runner calls
rank 0 makes, so that their collectives meet. Rank 0 sends each call (a request's arrival or release, a scheduled
step) to the other ranks of the first stage through torch.distributed before making it itself; each stage passes
it on to the next (worker.py). Without pipeline stages only rank 0's step outputs are used (the others compute the
same logits, gathered over the ranks, and drop what they sample); with them, the last stage's come back to rank 0,
and rank 0 can submit the next step before they do."""
from __future__ import annotations

import atexit
import threading
from collections import deque

import torch
import torch.distributed as dist

from kvserve.core.config import EngineConfig
from kvserve.core.distributed.parallel_state import PipelineStage, TensorParallel, pipeline_stage, set_parallel
from kvserve.core.distributed.pipeline import StageLink, rekeyed
from kvserve.core.distributed.ranks import free_port, start_ranks
from kvserve.core.distributed.worker import join_group, run_call, world_size
from kvserve.core.engine.model_runner import ModelRunner, StepOutput
from kvserve.core.engine.scheduler import ScheduledBatch
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.log import logger
from kvserve.plugins.manager import Platform

RANK_END_WAIT_S = 2.0   # after a collective fails, how long a rank that is ending may take to be seen ended


class RankFailure(RuntimeError):
    """A rank's process ended, or a call failed on rank 0 and left the ranks out of step: the engine stops."""


def leave_parallel_group() -> None:
    """Stop an earlier engine's ranks in this process, so that the next engine's layers are its own."""
    if DistributedRunner.active is not None:
        DistributedRunner.active.shutdown()


# Before multiprocessing's own exit handler ends the ranks' processes, which the watch would take for a failure.
atexit.register(leave_parallel_group)


class DistributedRunner:
    """Rank 0's model runner, as the engine uses it; every call it takes goes to the other ranks first. A thread
    watches the other ranks' processes: once one has ended, ``failure`` says which, and every call raises it."""

    active: DistributedRunner | None = None   # a process joins one group at a time

    def __init__(self, config: EngineConfig, platform: Platform, checkpoint: Checkpoint, model_cls: type):
        port = free_port()
        self.ranks = start_ranks(config, port)
        self.threads_before = torch.get_num_threads()
        if self.ranks.threads is not None:   # rank 0's share of this machine's threads
            torch.set_num_threads(self.ranks.threads)
        self.failure: RankFailure | None = None
        self.stopping = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="kvserve-rank-watch").start()
        try:
            self.first_stage_group = join_group(config, platform, 0, self.ranks.address, port,
                                                lambda: self.failure is None)
        except RuntimeError as exc:
            raise (self.failure or exc) from exc
        self.runner = ModelRunner(config, platform, checkpoint, model_cls)
        self.link = StageLink(platform.device)
        self.last_stage_rank = world_size(config) - config.parallel.tensor_parallel_size
        # Each step submitted and not yet collected: its output (one stage), or its sequences by id (several).
        self.submitted: deque[StepOutput | dict] = deque()
        DistributedRunner.active = self

    def __getattr__(self, name: str):   # what the engine reads of its runner: num_blocks, vocab_size, ...
        if "runner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["runner"], name)

    def add(self, *args) -> None:
        self._call("add", args)

    def release(self, *args) -> None:
        if self.failure is None:
            self._call("release", args)
        else:   # the engine forgets the request; no rank is left to tell
            self.runner.release(*args)

    def submit(self, batch: ScheduledBatch) -> None:
        out = self._call("execute", (batch,))
        if pipeline_stage().is_last:
            self.submitted.append(out)
        else:
            seqs = batch.seqs + [child for seq in batch.seqs for child in seq.pending_forks]
            self.submitted.append({seq.seq_id: seq for seq in seqs})

    def collect(self) -> StepOutput:
        """The output of the oldest step submitted and not collected, once the last stage has sent it."""
        entry = self.submitted.popleft()
        if isinstance(entry, StepOutput):
            return entry
        out, _ = self._guarded("execute", lambda: self.link.recv(self.last_stage_rank))
        return rekeyed(out, entry.__getitem__)

    def shutdown(self) -> None:
        """Stop the other ranks and leave the group."""
        self.stopping.set()
        if self.failure is None:
            self._call("stop", ())
            self.link.flush()
            self.ranks.join()
        dist.destroy_process_group()
        torch.set_num_threads(self.threads_before)
        set_parallel(TensorParallel(), PipelineStage())
        DistributedRunner.active = None

    def _call(self, name: str, args: tuple):
        def call():
            dist.broadcast_object_list([(name, args)], src=0, group=self.first_stage_group)
            return run_call(self.runner, self.link, (name, args))
        return self._guarded(name, call)

    def _guarded(self, name: str, call):
        if self.failure is not None:
            raise self.failure
        try:
            return call()
        except Exception as exc:   # a collective broke as a rank ended, or rank 0 alone failed
            self.ranks.wait(RANK_END_WAIT_S)
            self._note_failure()
            if self.failure is None:
                self.failure = RankFailure(
                    f"a split model's {name} failed on rank 0 ({type(exc).__name__}: {exc}); the other ranks are "
                    f"out of step with it, so the engine stops")
            raise self.failure from exc

    def _watch(self) -> None:
        self.ranks.wait()
        if not self.stopping.is_set():
            self._note_failure()

    def _note_failure(self) -> None:
        ended = self.ranks.ended()
        if ended is not None and self.failure is None:
            self.failure = RankFailure(f"{ended}; the engine cannot run without its share of the model")
            logger.error("%s", self.failure)
