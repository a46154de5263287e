"""A q/k/v projection that the checkpoint fuses into one tensor with the heads grouped, as GPT-NeoX and Falcon do."""
from __future__ import annotations

import torch

from kvserve.core.distributed.parallel_state import tensor_parallel
from kvserve.core.layers.linear import Linear
from kvserve.core.layers.parallel import _expect


class GroupedQKVLinear(Linear):
    """A q/k/v projection whose checkpoint tensor's rows are [groups, queries per group + 2, head_size]: each
    group's query heads, then its key head and its value head. GPT-NeoX's [heads, 3, head_size] is groups of one
    query head, Falcon-40B's a group per key-value head, Falcon-7B's multi-query one group of all.

    A tensor-parallel rank holds its query heads and the key and value of their groups (a copy, where the groups
    are fewer than the ranks), in the checkpoint's order, so that a quantized checkpoint's weight, whose rows cannot
    be reordered, loads as it is. ``split`` takes the queries, keys and values apart."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_size: int, bias: bool):
        q_first, q_heads = tensor_parallel().part(num_heads)
        per_group = num_heads // num_kv_heads
        groups = range(q_first // per_group, (q_first + q_heads - 1) // per_group + 1)
        # The rank's query heads within each of its groups: all of them, or its share of its one group.
        offset = q_first - groups.start * per_group
        queries = range(offset, offset + min(q_heads, per_group))
        super().__init__(hidden_size, len(groups) * (len(queries) + 2) * head_size, bias=bias)
        self.total_groups, self.per_group, self.head_size = num_kv_heads, per_group, head_size
        self.groups, self.queries = groups, queries
        self.num_heads, self.num_kv_heads = len(groups) * len(queries), len(groups)   # this rank's

    def checkpoint_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        rows = self.total_groups * (self.per_group + 2) * self.head_size
        _expect(f"a fused q/k/v {name}", tensor, (rows, self.in_features) if name == "weight" else (rows,))
        grouped = tensor.unflatten(0, (self.total_groups, self.per_group + 2, self.head_size))
        grouped = grouped[self.groups.start:self.groups.stop]
        queries = grouped[:, self.queries.start:self.queries.stop]
        return torch.cat([queries, grouped[:, self.per_group:]], dim=1).flatten(0, 2)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[tokens, heads, head_size] queries and [tokens, kv_heads, head_size] keys and values of this layer's
        [tokens, out_features] output."""
        grouped = qkv.unflatten(-1, (self.num_kv_heads, len(self.queries) + 2, self.head_size))
        queries = len(self.queries)
        return grouped[:, :, :queries].flatten(1, 2), grouped[:, :, queries], grouped[:, :, queries + 1]
