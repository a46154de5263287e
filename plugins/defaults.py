"""Portable reference implementations a platform may return from its hooks."""
from __future__ import annotations

import torch
import torch.distributed as dist

from kvserve.plugins.interfaces import Communicator


class TorchDistributedCommunicator(Communicator):
    """Collectives over a torch.distributed process group (None: the default one); a single rank needs none."""

    def __init__(self, rank: int, world_size: int, backend: str, group=None):
        super().__init__(rank, world_size)
        self.backend, self.group = backend, group
        if world_size > 1 and not dist.is_initialized():
            raise ValueError(f"world_size={world_size} needs an initialized torch.distributed process group "
                             f"(backend {backend!r}); initialize it before building the communicator")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(tensor, group=self.group, group_src=src)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)
