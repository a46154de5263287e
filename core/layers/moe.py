"""Mixture-of-experts feed-forward blocks: a router picks each token's top-k experts, whose gated MLPs run through
the ``fused_moe`` op on every expert's weights stacked in one tensor per projection."""
from __future__ import annotations

import torch
from torch import nn

from kvserve.core.distributed.parallel_state import tensor_parallel
from kvserve.core.layers.ops import Ops


class ExpertWeights(nn.Module):
    """One projection of the experts this rank holds (``first_expert`` on, ``num_experts`` of them), stacked
    [experts, out, in]. Shard (expert, part) of the checkpoint fills that expert's rows of ``part``: ``parts``
    gives each part's (rows here, first row in the checkpoint's tensor, its rows there), ``inputs`` the columns
    (first in the checkpoint's tensor, columns here, its columns there). Another rank's experts are not read."""

    def __init__(self, first_expert: int, num_experts: int, parts: dict[str, tuple[int, int, int]],
                 inputs: tuple[int, int, int]):
        super().__init__()
        rows = sum(size for size, _, _ in parts.values())
        self.weight = nn.Parameter(torch.empty(num_experts, rows, inputs[1]))
        self.first_expert, self.num_experts, self.parts, self.inputs = first_expert, num_experts, parts, inputs
        self.part_rows, offset = {}, 0
        for part, (size, _, _) in parts.items():
            self.part_rows[part] = (offset, size)
            offset += size
        self.shard_offsets = [(expert, part) for expert in range(first_expert, first_expert + num_experts)
                              for part in parts]

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]) -> None:
        expert, part = shard
        if not self.first_expert <= expert < self.first_expert + self.num_experts:
            return
        size, first_row, total_rows = self.parts[part]
        first_input, num_inputs, total_inputs = self.inputs
        if tuple(loaded.shape) != (total_rows, total_inputs):
            raise ValueError(f"expert {expert}'s {part} projection has shape {tuple(loaded.shape)}, expected "
                             f"{(total_rows, total_inputs)}")
        target = param.data[expert - self.first_expert].narrow(0, *self.part_rows[part])
        target.copy_(loaded.narrow(0, first_row, size).narrow(1, first_input, num_inputs))


def expert_mapping(prefix: str, num_experts: int, names: dict[str, str], module: str = "mlp") -> dict:
    """packed_modules_mapping entries from a checkpoint's per-expert tensors ``{prefix}.experts.{i}.{name}``
    (``names``: name -> gate, up or down) to the stacked weights of the block at ``module``."""
    stacked = {"gate": "w13", "up": "w13", "down": "w2"}
    return {f"{prefix}.experts.{i}.{name}": (f"{module}.experts.{stacked[part]}", (i, part))
            for i in range(num_experts) for name, part in names.items()}


class Experts(nn.Module):
    """The experts' weights on this rank: with expert parallelism its share of the experts, whole; otherwise
    every expert's share of the intermediate columns (the ranks' outputs are summed either way)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        tp = tensor_parallel()
        self.first, self.count = tp.part(num_experts) if tp.expert_parallel else (0, num_experts)
        first_column, columns = (0, intermediate_size) if tp.expert_parallel else tp.part(intermediate_size)
        gate_up = (columns, first_column, intermediate_size)
        self.w13 = ExpertWeights(self.first, self.count, {"gate": gate_up, "up": gate_up},
                                 (0, hidden_size, hidden_size))
        self.w2 = ExpertWeights(self.first, self.count, {"down": (hidden_size, 0, hidden_size)},
                                (first_column, columns, intermediate_size))


class SparseMoe(nn.Module):
    """Softmax over the router's logits, each token's ``top_k`` largest (renormalized to sum to 1 with
    ``normalize``, rounded to the model's dtype with ``round_weights``), their experts' outputs weighed by them;
    plus, where given, a shared expert that every token takes, scaled by the sigmoid of its own gate."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, ops: Ops,
                 normalize: bool, round_weights: bool = False, shared_expert: nn.Module | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and the {num_experts} experts")
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.num_experts, self.top_k, self.normalize, self.round_weights = num_experts, top_k, normalize, round_weights
        self.ops, self.tp = ops, tensor_parallel()
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = torch.softmax(self.gate(x).float(), dim=-1).topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.round_weights:
            weights = weights.to(x.dtype)
        experts = self.experts
        if experts.count < self.num_experts:   # this rank's experts by their index here; the others' skipped
            ids = torch.where((ids >= experts.first) & (ids < experts.first + experts.count), ids - experts.first, -1)
        out = self.tp.all_reduce(self.ops.fused_moe(x, experts.w13.weight, experts.w2.weight, weights, ids))
        if self.shared_expert is None:
            return out
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
