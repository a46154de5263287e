"""This process's place in its model replica: its rank in its pipeline stage's tensor-parallel group (how many
ranks there are, and the platform's communicator for their collectives), and which pipeline stage it runs. Set
once per process, before the model is built; a process that never sets them is the only rank, and its layers are
the unsplit ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

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


@dataclass(frozen=True)
class PipelineStage:
    """Stage ``index`` of ``size``: the first embeds the tokens, the last computes the logits, and each runs its
    share of the decoder layers on the hidden states the one before it sends."""

    index: int = 0
    size: int = 1

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.size - 1

    def layers(self, num_layers: int) -> range:
        """This stage's decoder layers: consecutive, as many as every other stage's or one fewer."""
        return range(self.index * num_layers // self.size, (self.index + 1) * num_layers // self.size)


_tensor_parallel, _pipeline_stage = TensorParallel(), PipelineStage()


def tensor_parallel() -> TensorParallel:
    return _tensor_parallel


def pipeline_stage() -> PipelineStage:
    return _pipeline_stage


def set_parallel(group: TensorParallel, stage: PipelineStage) -> None:
    global _tensor_parallel, _pipeline_stage
    _tensor_parallel, _pipeline_stage = group, stage


def fewest_over_ranks(counts: list[int], device: torch.device) -> list[int]:
    """Each count's smallest value over the replica's ranks (the counts themselves with one rank)."""
    if not dist.is_initialized():
        return counts
    values = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values.tolist()
