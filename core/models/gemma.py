"""Gemma: the Llama decoder with RMS norms that scale by (1 + weight) in float32, the embeddings scaled by
sqrt(hidden_size), a GeGLU feed-forward (GELU's tanh approximation), heads of the config's ``head_dim`` and the output
head tied to the embedding."""
from __future__ import annotations

import torch
from torch import nn

from kvserve.core.distributed.parallel_state import tensor_parallel
from kvserve.core.layers.linear import MergedLinear
from kvserve.core.layers.ops import Ops
from kvserve.core.layers.parallel import RowParallelLinear
from kvserve.core.models.llama import LlamaDecoderLayer, LlamaForCausalLM, RMSNorm
from kvserve.plugins.interfaces import AttentionMetadata

GEMMA_ACTIVATION = "gelu_pytorch_tanh"


def constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a float32 tensor rounded to ``like``'s dtype, on its device: a tensor, not a Python number, as
    operands of the CPU platform's captured graphs must be."""
    return torch.full((), value, device=like.device).to(like.dtype)


class GemmaRMSNorm(RMSNorm):
    """Normalizes and scales by (1 + weight) in float32, then rounds to the input's dtype, as transformers' Gemma
    does (Llama's rounds before it scales)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.scale(x)
        residual = x + residual
        return self.scale(residual), residual

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float()
        return self.ops.rms_norm(x.float(), constant(1.0, weight) + weight, self.eps).to(x.dtype)


class GemmaDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer with Gemma's norms."""

    def __init__(self, config, ops: Ops, *args, **kwargs):
        super().__init__(config, ops, *args, **kwargs)
        self.input_layernorm, self.post_attention_layernorm = gemma_norm(config, ops), gemma_norm(config, ops)


def gemma_norm(config, ops: Ops) -> GemmaRMSNorm:
    return GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, ops)


class GemmaMLP(nn.Module):
    """gelu_tanh(gate) * up, then down. The gate-up layer is a MergedLinear, not a GateUpLinear: a platform's fused
    gate-up kernel applies SiLU."""

    def __init__(self, hidden_size: int, intermediate_size: int, ops: Ops):
        super().__init__()
        first, size = tensor_parallel().part(intermediate_size)   # this rank's columns of the intermediate
        rows = (first, intermediate_size)
        self.gate_up_proj = MergedLinear(hidden_size, {"gate": size, "up": size},
                                         checkpoint_rows={"gate": rows, "up": rows})
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False)
        self.gelu_tanh_and_mul = ops.gelu_tanh_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gelu_tanh_and_mul(self.gate_up_proj(x)))


class GemmaForCausalLM(LlamaForCausalLM):
    """The Llama decoder with Gemma's norms in place of Llama's, its GeGLU feed-forward and its embedding scale."""

    eagle_target = False   # its embeddings are scaled, which a draft sharing embed_tokens would miss
    decoder_layer = GemmaDecoderLayer

    def __init__(self, config, ops: Ops):
        for name in ("hidden_act", "hidden_activation"):
            if getattr(config, name, None) not in (None, GEMMA_ACTIVATION):
                raise ValueError(f"Gemma checkpoints with {name}={getattr(config, name)!r} are not supported; "
                                 f"allowed: {GEMMA_ACTIVATION!r}")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma checkpoints with use_bidirectional_attention=True are not supported; "
                             "allowed: False (causal attention)")
        super().__init__(config, ops)
        self.embed_scale = config.hidden_size ** 0.5
        if self.model.norm is not None:
            self.model.norm = gemma_norm(config, ops)

    def make_mlp(self, config, ops: Ops, layer: int) -> nn.Module:
        return GemmaMLP(config.hidden_size, config.intermediate_size, ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        if intermediate is None:
            embeds = self.model.embed_tokens(input_ids)
            intermediate = embeds * constant(self.embed_scale, embeds), None
        return self.model(input_ids, positions, metadata, intermediate)
