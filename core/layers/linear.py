"""Linear layers: a platform may replace their matmul with a kernel prepared once from the loaded weight
(platform_linear_kernel, platform_gate_up_kernel for a gated MLP's gate-up layer, or platform_quant_kernel for a
quantized one); merged layers fuse several checkpoint tensors (qkv, gate-up) into one matmul."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.core.distributed.parallel_state import tensor_parallel
from kvserve.core.quantization import join_shards
from kvserve.plugins.interfaces import QuantizedWeight

LinearKernel = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class Linear(nn.Linear):
    """nn.Linear that runs the platform's kernel for its weight once use_platform_kernels gave it one. A checkpoint
    may give it a quantized weight instead of a float one (``quantized``, its float weight then dropped)."""

    kernel: LinearKernel | None = None
    quantized: QuantizedWeight | None = None
    lora: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None   # adds adapters' output (core/lora)

    def load_quantized(self, weight: QuantizedWeight, shard: str | None = None) -> None:
        if weight.shape != tuple(self.weight.shape):
            raise ValueError(f"quantized weight has shape {weight.shape}, expected {tuple(self.weight.shape)}")
        self.quantized = weight

    def finish_loading(self, dequantize: Callable[[QuantizedWeight], torch.Tensor]) -> None:
        """After the checkpoint's last tensor: a quantized layer drops its float weight."""
        if self.quantized is not None:
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias) if self.kernel is None else self.kernel(x, self.bias)
        return out if self.lora is None else self.lora(x, out)

    @classmethod
    def tied_to(cls, embedding: nn.Embedding) -> Linear:
        """The output projection of a model whose lm_head is its input embedding: the same parameter."""
        with torch.device(embedding.weight.device):
            head = cls(embedding.embedding_dim, embedding.num_embeddings, bias=False)
        head.weight = embedding.weight
        return head


KernelFactory = Callable[[str, torch.Tensor | QuantizedWeight], LinearKernel | None]


def use_platform_kernels(model: nn.Module, make_kernel: KernelFactory, make_gate_up_kernel: KernelFactory) -> None:
    """Give every Linear of ``model`` the kernel ``make_kernel(name, weight)`` prepares for its float or quantized
    weight, if any, and every GateUpLinear with a float weight the one ``make_gate_up_kernel`` fuses with its
    activation, if any; the kernel holds the weight in its own layout (or quantized), so the layer drops its
    reference to the original."""
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        fusable = isinstance(module, GateUpLinear) and module.quantized is None
        kernel = make_gate_up_kernel(name, module.weight) if fusable else None
        if kernel is not None:
            module.activated = True
        else:
            kernel = make_kernel(name, module.quantized or module.weight)
        if kernel is not None:
            module.kernel = kernel
            module.weight = module.quantized = None


class MergedLinear(Linear):
    """One matmul for several projections of the same input; each shard loads from its own tensor, or with
    ``checkpoint_rows`` ({shard: (first, total)}) from rows [first, first + its size) of a tensor of ``total``
    rows: a tensor-parallel rank's part."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False,
                 checkpoint_rows: dict[str, tuple[int, int]] | None = None):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard, size in shard_sizes.items():
            self.shard_offsets[shard] = (offset, size)
            offset += size
        self.checkpoint_rows = checkpoint_rows or {shard: (0, size) for shard, size in shard_sizes.items()}
        self.quantized_shards: dict[str, QuantizedWeight] = {}

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        """Copy ``shard``'s rows of ``loaded`` into the rows of ``param`` (this layer's weight or bias) it owns."""
        offset, size = self.shard_offsets[shard]
        target = param.data.narrow(0, offset, size)
        first, total = self.checkpoint_rows[shard]
        if (total, *target.shape[1:]) != loaded.shape:
            raise ValueError(f"shard {shard!r} has shape {tuple(loaded.shape)}, expected "
                             f"{(total, *target.shape[1:])}")
        target.copy_(loaded.narrow(0, first, size))

    def load_quantized(self, weight: QuantizedWeight, shard: str | None = None) -> None:
        """Keep ``shard``'s quantized weight until finish_loading joins the shards."""
        size = self.shard_offsets[shard][1]
        if weight.shape != (size, self.in_features):
            raise ValueError(f"shard {shard!r} has shape {weight.shape}, expected {(size, self.in_features)}")
        self.quantized_shards[shard] = weight

    def finish_loading(self, dequantize: Callable[[QuantizedWeight], torch.Tensor]) -> None:
        """Shards quantized alike join into one quantized weight; otherwise (a checkpoint that mixes types within
        the layer) the quantized ones are ``dequantize``d into the float weight."""
        shards, self.quantized_shards = self.quantized_shards, {}
        if len(shards) == len(self.shard_offsets):
            self.quantized = join_shards([shards[shard] for shard in self.shard_offsets], tuple(self.weight.shape))
            if self.quantized is not None:
                self.weight = None
                return
        for shard, weight in shards.items():
            self.load_shard(self.weight, dequantize(weight), shard)


class GateUpLinear(MergedLinear):
    """A gated MLP's gate and up projections as one matmul, then silu(gate) * up: in one kernel where the
    platform fuses the two (platform_gate_up_kernel), else the matmul and the silu_and_mul op."""

    activated = False   # whether the kernel applies silu_and_mul itself

    def __init__(self, in_features: int, intermediate_size: int, silu_and_mul: Callable[[torch.Tensor], torch.Tensor]):
        first, size = tensor_parallel().part(intermediate_size)   # this rank's columns of the intermediate
        super().__init__(in_features, {"gate": size, "up": size},
                         checkpoint_rows={"gate": (first, intermediate_size), "up": (first, intermediate_size)})
        self.silu_and_mul = silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.activated else self.silu_and_mul(out)
