"""Each adaptable linear layer's stacked adapter weights, and the batched matmuls that add them to its output.

Slot 0 of every stack holds zeros (no adapter); slots 1..max_loras hold the adapters on the device. A step names
each token's slot once (``LoRAStep.token_slots``), and every layer then adds ``B[slot] @ A[slot] @ x`` for all its
tokens in one shrink and one expand per shard (punica's bgmv), whatever mix of adapters the step runs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvserve.core.layers.linear import Linear
from kvserve.core.layers.ops import Ops
from kvserve.core.layers.parallel import ParallelLMHead


class LoRAStep:
    """What the step being run tells every LoRA layer: each token's adapter slot, or None when no token of the
    step has an adapter (the layers then add nothing)."""

    token_slots: torch.Tensor | None = None


@dataclass(frozen=True)
class Target:
    """Where a checkpoint module's LoRA goes: the model's linear layer, and which of its shards (a merged qkv or
    gate-up layer's parts; (0,) for an unmerged layer) the module's output rows are."""

    layer: str
    shards: tuple[int, ...]


def adaptable_layers(model: nn.Module) -> dict[str, Linear]:
    """The model's linear layers that take adapters: all but the output head."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, Linear) and not isinstance(module, ParallelLMHead) and name != "lm_head"}


def checkpoint_targets(model: nn.Module, layers: dict[str, Linear]) -> dict[str, Target]:
    """Each checkpoint module name an adapter may target (``model.layers.0.self_attn.q_proj``), through the model's
    ``packed_modules_mapping`` as the weight loader reads it."""
    mapping = getattr(model, "packed_modules_mapping", {})
    targets: dict[str, Target] = {}
    for name, layer in layers.items():
        shards = list(getattr(layer, "shard_offsets", {}))
        sources = [(source, packed, shard) for source, (packed, shard) in mapping.items()
                   if name.endswith("." + packed)]
        if not sources and not shards:
            targets[name] = Target(name, (0,))
        for source, packed, shard in sources:
            parts = shard if isinstance(shard, tuple) else (shard,)
            checkpoint_name = name[:len(name) - len(packed)] + source
            if shard is None and not shards:
                targets[checkpoint_name] = Target(name, (0,))
            elif all(part in shards for part in parts):
                targets[checkpoint_name] = Target(name, tuple(shards.index(part) for part in parts))
    return targets


def shard_sizes(layer: Linear) -> list[int]:
    return [size for _, size in getattr(layer, "shard_offsets", {}).values()] or [layer.out_features]


class LoRALayer:
    """A linear layer's adapters: A of every shard stacked along the rank, [slots, shards * rank, in], and B of
    each shard, [slots, shard size, rank], with the adapter's scale folded in."""

    def __init__(self, layer: Linear, step: LoRAStep, ops: Ops, slots: int, rank: int, dtype: torch.dtype,
                 device: torch.device):
        self.step, self.ops, self.rank = step, ops, rank
        sizes = shard_sizes(layer)
        self.lora_a = torch.zeros(slots, len(sizes) * rank, layer.in_features, dtype=dtype, device=device)
        # Stored [size, slots, rank] and viewed as [slots, size, rank]: lora_expand's one matmul then reads B in
        # place instead of copying it into [size, slots * rank] on every call.
        self.lora_b = [torch.zeros(size, slots, rank, dtype=dtype, device=device).transpose(0, 1) for size in sizes]

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        slots = self.step.token_slots
        if slots is None:
            return out
        shrunk = self.ops.lora_shrink(x, self.lora_a, slots).split(self.rank, dim=-1)
        deltas = [self.ops.lora_expand(y, lora_b, slots) for y, lora_b in zip(shrunk, self.lora_b)]
        return out + (deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1))

    def load(self, slot: int, weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put an adapter in ``slot``: {shard: (A [rank, in], scaled B [shard size, rank])}, zeros elsewhere."""
        self.lora_a[slot].zero_()
        for lora_b in self.lora_b:
            lora_b[slot].zero_()
        for shard, (a, b) in weights.items():
            rank = a.shape[0]
            self.lora_a[slot, shard * self.rank:shard * self.rank + rank].copy_(a)
            self.lora_b[shard][slot, :, :rank].copy_(b)
