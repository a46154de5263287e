"""A tensor-parallel rank: joins the group, builds its shard of the model and KV cache, then makes every model
runner call rank 0 sends it, until told to stop. The same code runs in a spawned process or a Ray actor."""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from kvserve.core.config import EngineConfig
from kvserve.core.distributed.parallel_state import TensorParallel, set_tensor_parallel
from kvserve.core.engine.model_runner import ModelRunner
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.models.registry import resolve_model_class
from kvserve.plugins.manager import Platform, PluginManager

# How long a collective waits for the other ranks (loading a large shard included) before it fails.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
WAIT_S = COLLECTIVE_TIMEOUT.total_seconds()


def join_group(config: EngineConfig, platform: Platform, rank: int, address: str, port: int,
               others_alive: Callable[[], bool] = lambda: True) -> None:
    """Join the group through rank 0's store on ``address``:``port``, then set up the platform's communicator.
    Rank 0 waits for every other rank to reach the store first, giving up as soon as ``others_alive`` says
    one has ended (the group's own rendezvous would wait out its whole timeout)."""
    size = config.parallel.tensor_parallel_size
    store = dist.TCPStore(address, port, size, is_master=rank == 0, timeout=COLLECTIVE_TIMEOUT,
                          wait_for_workers=False)
    if rank == 0:
        arrivals, deadline = [f"rank-{other}-arrived" for other in range(1, size)], time.monotonic() + WAIT_S
        while not store.check(arrivals):
            if not others_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"not every tensor-parallel rank reached rank 0 within {WAIT_S:.0f}s")
            time.sleep(0.05)
    else:
        store.set(f"rank-{rank}-arrived", "1")
    dist.init_process_group(platform.info.dist_backend, store=store, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT)
    set_tensor_parallel(TensorParallel(rank, size, platform.communicator(rank, size),
                                       config.parallel.enable_expert_parallel))


def run_rank(config: EngineConfig, rank: int, address: str, port: int) -> None:
    plugins = PluginManager()
    platform = plugins.select_platform(config.device.device)
    join_group(config, platform, rank, address, port)
    platform.seed(config.model.seed)
    checkpoint = Checkpoint.open(config.model.model)
    runner = ModelRunner(config, platform, checkpoint, resolve_model_class(checkpoint.hf_config, plugins.models()))
    while True:
        call = [None]
        dist.broadcast_object_list(call, src=0)
        name, args = call[0]
        if name == "stop":
            break
        getattr(runner, name)(*args)
    dist.destroy_process_group()
