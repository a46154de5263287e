"""This process's place in its model replica's tensor-parallel group: its rank, how many ranks there are, and the
platform's communicator for their collectives. Set once per process, before the model is built; a process that
never sets it is the only rank, and its layers are the unsharded ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.plugins.interfaces import Communicator


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    communicator: Communicator | None = None
    expert_parallel: bool = False   # mixture-of-experts layers split their experts over the ranks, not the columns

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.size == 1 else self.communicator.all_reduce(tensor)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return tensor if self.size == 1 else self.communicator.all_gather(tensor, dim)

    def part(self, total: int) -> tuple[int, int]:
        """(first, count) of this rank's equal share of ``total`` things, which the size divides."""
        count = total // self.size
        return self.rank * count, count


_current = TensorParallel()


def tensor_parallel() -> TensorParallel:
    return _current


def set_tensor_parallel(group: TensorParallel) -> None:
    global _current
    _current = group
