"""Linear layers whose weights are fused from several checkpoint tensors (qkv, gate-up)."""
from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One matmul for several projections of the same input; each shard loads from its own tensor."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard, size in shard_sizes.items():
            self.shard_offsets[shard] = (offset, size)
            offset += size

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        """Copy ``loaded`` into the rows of ``param`` (this layer's weight or bias) that ``shard`` owns."""
        offset, size = self.shard_offsets[shard]
        target = param.data.narrow(0, offset, size)
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard!r} has shape {tuple(loaded.shape)}, expected {tuple(target.shape)}")
        target.copy_(loaded)
