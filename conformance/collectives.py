"""One rank of the communicator check, in a spawned process of its own: it binds its device, joins a
torch.distributed group over the platform's dist_backend, and checks each collective over the default group and a
subgroup of both ranks."""
from __future__ import annotations

import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

WORLD_SIZE = 2


def rank_tensor(rank: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32, device=device).view(shape) * (rank + 1) + rank


def check_collectives(communicator, rank: int, device: torch.device) -> None:
    shape = (3, 5)
    mine = rank_tensor(rank, shape, device)
    everyone = [rank_tensor(r, shape, torch.device("cpu")) for r in range(WORLD_SIZE)]
    torch.testing.assert_close(communicator.all_reduce(mine.clone()).cpu(), sum(everyone))
    for dim in (0, -1):
        torch.testing.assert_close(communicator.all_gather(mine, dim=dim).cpu(), torch.cat(everyone, dim=dim))
    src = WORLD_SIZE - 1
    torch.testing.assert_close(communicator.broadcast(mine.clone(), src=src).cpu(), everyone[src])
    communicator.barrier()


def run_rank(rank: int, platform_name: str, address: str, results) -> None:
    """Put (rank, "ok" | "skip" | "fail", detail) on ``results``."""
    from kvserve.plugins.manager import PluginManager

    try:
        platform = PluginManager().select_platform(platform_name)
        try:
            platform.bind_device(rank)
        except ValueError as exc:
            results.put((rank, "skip", f"rank {rank} has no device of its own: {exc}"))
            return
        dist.init_process_group(platform.info.dist_backend, init_method=address, rank=rank, world_size=WORLD_SIZE,
                                timeout=timedelta(seconds=120))
        check_collectives(platform.communicator(rank, WORLD_SIZE), rank, platform.device)
        check_collectives(platform.communicator(rank, WORLD_SIZE, dist.new_group(list(range(WORLD_SIZE)))), rank,
                          platform.device)
        results.put((rank, "ok", ""))
    except Exception:  # reported to the test, which fails with it
        results.put((rank, "fail", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
