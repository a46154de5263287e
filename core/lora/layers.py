"""Each adaptable linear layer's stacked adapter weights, and the two matmuls that add them to its output.

Slots 0..max_loras-1 hold the adapters on the device. A step marks each token's slot once (``LoRAStep``), and
every layer then adds ``B[slot] @ A[slot] @ x`` for all its tokens: one matmul through every slot's A, the other
slots' columns zeroed, one through every slot's B, whatever mix of adapters the step runs (no loop over requests
or adapters, no host sync)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.core.layers.linear import Linear, LinearKernel
from kvserve.core.layers.parallel import ParallelLMHead

KernelMaker = Callable[[torch.Tensor], LinearKernel | None]   # the platform's linear_kernel hook


class LoRAStep:
    """What the step being run tells every LoRA layer: the adapter slot each token takes, as a [tokens, slots, 1]
    mask of ones (its slot) and zeros, or None when no token of the step has an adapter (the layers then add
    nothing)."""

    slot_mask: torch.Tensor | None = None

    def take(self, token_slots: torch.Tensor, slots: int, dtype: torch.dtype, device: torch.device) -> None:
        """Each token's slot (``token_slots``, on the host; -1: no adapter) for the next step."""
        mask = token_slots[:, None, None] == torch.arange(slots)[:, None]
        self.slot_mask = mask.to(dtype).to(device, non_blocking=True)


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


def kernel_for(weight: torch.Tensor, make_kernel: KernelMaker) -> LinearKernel:
    """The platform's matmul prepared for ``weight``, else torch's, which reads it in place."""
    return make_kernel(weight) or (lambda x, bias: F.linear(x, weight, bias))


class LoRALayer:
    """A linear layer's adapters, all slots in one matmul pair. A is stacked as [slots x shards x rank, in] (a
    merged qkv or gate-up layer's shards side by side within each slot), B as [out, slots x shards x rank], each
    shard's rows under its own columns only, the adapter's scale folded in. A step takes its tokens through every
    slot's A, zeroes each token's columns of the slots it does not take (the step's mask), and takes the rest
    through B: two matmuls on the platform's linear kernel, whatever the mix of adapters, prepared again whenever
    a slot's adapter changes. Their cost grows with max_loras x max_lora_rank, not with the adapters a step runs."""

    def __init__(self, layer: Linear, step: LoRAStep, make_kernel: KernelMaker, slots: int, rank: int,
                 dtype: torch.dtype, device: torch.device):
        self.step, self.make_kernel, self.rank, self.slots = step, make_kernel, rank, slots
        self.offsets = [0, *itertools.accumulate(shard_sizes(layer))]
        self.slot_width = (len(self.offsets) - 1) * rank
        self.lora_a = torch.zeros(slots * self.slot_width, layer.in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(self.offsets[-1], slots * self.slot_width, dtype=dtype, device=device)
        self.prepare_kernels()

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        mask = self.step.slot_mask
        if mask is None:
            return out
        every_slot = self.shrink(x, None).view(-1, self.slots, self.slot_width)
        return out + self.expand((every_slot * mask).flatten(1), None)

    def load(self, slot: int, weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put an adapter in ``slot``: {shard: (A [rank, in], scaled B [shard size, rank])}, zeros elsewhere. The
        kernels read it once ``prepare_kernels`` has run."""
        first = slot * self.slot_width
        self.lora_a[first:first + self.slot_width].zero_()
        self.lora_b[:, first:first + self.slot_width].zero_()
        for shard, (a, b) in weights.items():
            column = first + shard * self.rank
            self.lora_a[column:column + a.shape[0]].copy_(a)
            self.lora_b[self.offsets[shard]:self.offsets[shard + 1], column:column + a.shape[0]].copy_(b)

    def prepare_kernels(self) -> None:
        self.shrink = kernel_for(self.lora_a, self.make_kernel)
        self.expand = kernel_for(self.lora_b, self.make_kernel)
