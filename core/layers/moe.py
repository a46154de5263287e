"""Mixture-of-experts feed-forward blocks: a router picks each token's top-k experts, whose gated MLPs run through
the ``fused_moe`` op on every expert's weights stacked in one tensor per projection."""
from __future__ import annotations

import torch
from torch import nn

from kvserve.core.layers.ops import Ops


class ExpertWeights(nn.Module):
    """One projection of every expert, stacked [experts, out, in]: the checkpoint's tensor for shard (expert,
    part) fills that expert's rows of ``part``."""

    def __init__(self, num_experts: int, parts: dict[str, int], in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, sum(parts.values()), in_features))
        self.part_rows, offset = {}, 0
        for part, size in parts.items():
            self.part_rows[part] = (offset, size)
            offset += size
        self.shard_offsets = [(expert, part) for expert in range(num_experts) for part in parts]

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]) -> None:
        expert, part = shard
        target = param.data[expert].narrow(0, *self.part_rows[part])
        if target.shape != loaded.shape:
            raise ValueError(f"expert {expert}'s {part} projection has shape {tuple(loaded.shape)}, expected "
                             f"{tuple(target.shape)}")
        target.copy_(loaded)


def expert_mapping(prefix: str, num_experts: int, names: dict[str, str], module: str = "mlp") -> dict:
    """packed_modules_mapping entries from a checkpoint's per-expert tensors ``{prefix}.experts.{i}.{name}``
    (``names``: name -> gate, up or down) to the stacked weights of the block at ``module``."""
    stacked = {"gate": "w13", "up": "w13", "down": "w2"}
    return {f"{prefix}.experts.{i}.{name}": (f"{module}.experts.{stacked[part]}", (i, part))
            for i in range(num_experts) for name, part in names.items()}


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w13 = ExpertWeights(num_experts, {"gate": intermediate_size, "up": intermediate_size}, hidden_size)
        self.w2 = ExpertWeights(num_experts, {"down": hidden_size}, intermediate_size)


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
        self.top_k, self.normalize, self.round_weights, self.ops = top_k, normalize, round_weights, ops
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = torch.softmax(self.gate(x).float(), dim=-1).topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.round_weights:
            weights = weights.to(x.dtype)
        out = self.ops.fused_moe(x, self.experts.w13.weight, self.experts.w2.weight, weights, ids)
        if self.shared_expert is None:
            return out
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
