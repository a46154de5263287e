"""A rank of a split model replica: joins the group, builds its shard of the model and KV cache, then makes every
model runner call it is given, until told to stop. The ranks of the first pipeline stage get each call from rank 0;
those of a later stage from their place in the stage before, with the hidden states of a step. The same code runs
in a spawned process or a Ray actor."""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from kvserve.core.config import EngineConfig
from kvserve.core.distributed.parallel_state import (PipelineStage, TensorParallel, pipeline_stage, set_parallel,
                                                     tensor_parallel)
from kvserve.core.distributed.pipeline import StageLink, rekeyed, seq_id
from kvserve.core.engine.model_runner import ModelRunner, StepOutput
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.log import init_logging
from kvserve.core.models.registry import resolve_model_class
from kvserve.plugins.manager import Platform, PluginManager

# How long a collective waits for the other ranks (loading a large shard included) before it fails.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
WAIT_S = COLLECTIVE_TIMEOUT.total_seconds()


def world_size(config: EngineConfig) -> int:
    return config.parallel.tensor_parallel_size * config.parallel.pipeline_parallel_size


def local_device_index(config: EngineConfig, rank: int) -> int:
    """Which of this machine's devices rank ``rank`` of this replica takes: the replicas' ranks, in turn."""
    return config.parallel.data_parallel_rank * world_size(config) + rank


def join_group(config: EngineConfig, platform: Platform, rank: int, address: str, port: int,
               others_alive: Callable[[], bool] = lambda: True):
    """Join the group through rank 0's store on ``address``:``port``, then set up this rank's stage and the
    platform's communicator for its stage's ranks; returns the first stage's group, which rank 0's calls go to.
    Rank 0 waits for every other rank to reach the store first, giving up as soon as ``others_alive`` says one
    has ended (the group's own rendezvous would wait out its whole timeout)."""
    size, tp_size, pp_size = (world_size(config), config.parallel.tensor_parallel_size,
                              config.parallel.pipeline_parallel_size)
    store = dist.TCPStore(address, port, size, is_master=rank == 0, timeout=COLLECTIVE_TIMEOUT,
                          wait_for_workers=False)
    if rank == 0:
        arrivals, deadline = [f"rank-{other}-arrived" for other in range(1, size)], time.monotonic() + WAIT_S
        while not store.check(arrivals):
            if not others_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"not every rank reached rank 0 within {WAIT_S:.0f}s")
            time.sleep(0.05)
    else:
        store.set(f"rank-{rank}-arrived", "1")
    dist.init_process_group(platform.info.dist_backend, store=store, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT)
    # Every rank makes every stage's group, in the same order, as torch.distributed requires.
    groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)] \
        if pp_size > 1 else [None]
    stage, tp_rank = divmod(rank, tp_size)
    set_parallel(TensorParallel(tp_rank, tp_size, platform.communicator(tp_rank, tp_size, groups[stage]),
                                config.parallel.enable_expert_parallel), PipelineStage(stage, pp_size))
    return groups[0]


def run_call(runner: ModelRunner, link: StageLink, call: tuple, intermediate: tuple = ()) -> StepOutput | None:
    """Make ``call`` on this rank's runner and pass it on to the next stage; the last stage's step output."""
    name, args = call
    result = None if name == "stop" else getattr(runner, name)(*args, *((intermediate,) if intermediate else ()))
    if pipeline_stage().is_last:
        return result
    link.send(dist.get_rank() + tensor_parallel().size, call, result if name == "execute" else ())
    return None


def receive_call(first_stage_group, link: StageLink) -> tuple[tuple, tuple]:
    """The next call for this rank (not rank 0), and the hidden states that come with a step's."""
    if pipeline_stage().is_first:
        call = [None]
        dist.broadcast_object_list(call, src=0, group=first_stage_group)
        return call[0], ()
    return link.recv(dist.get_rank() - tensor_parallel().size)


def run_rank(config: EngineConfig, rank: int, address: str, port: int, threads: int | None) -> None:
    """``threads``: this rank's share of its machine's, if it has one."""
    if threads is not None:
        torch.set_num_threads(threads)
    init_logging(f" [rank {rank}]")
    plugins = PluginManager()
    platform = plugins.select_platform(config.device.device)
    platform.bind_device(local_device_index(config, rank))
    first_stage_group = join_group(config, platform, rank, address, port)
    platform.seed(config.model.seed)
    checkpoint = Checkpoint.open(config.model)
    model_cls = resolve_model_class(checkpoint.hf_config, plugins.models(), config)
    runner = ModelRunner(config, platform, checkpoint, model_cls)
    link = StageLink(platform.device)
    reports = pipeline_stage().is_last and not pipeline_stage().is_first and tensor_parallel().rank == 0
    while True:
        call, intermediate = receive_call(first_stage_group, link)
        out = run_call(runner, link, call, intermediate)
        if call[0] == "stop":
            break
        if reports and call[0] == "execute":
            link.send(0, rekeyed(out, seq_id))
    link.flush()
    dist.destroy_process_group()
