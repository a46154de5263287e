"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's decoder whose sparse layers route each token to
``num_experts_per_tok`` of ``num_experts`` experts (renormalized with ``norm_topk_prob``) beside a shared expert
gated per token; the layers in ``mlp_only_layers`` or off the ``decoder_sparse_step`` keep a dense MLP."""
from __future__ import annotations

from torch import nn

from kvserve.core.layers.moe import SparseMoe, expert_mapping
from kvserve.core.layers.ops import Ops
from kvserve.core.models.llama import LlamaForCausalLM, LlamaMLP
from kvserve.core.models.qwen2 import Qwen2ForCausalLM


def qwen_moe_packed_modules(config) -> dict:
    """The packed_modules_mapping of Qwen's mixtures of experts: each ``mlp.experts.{i}`` into the stacked ones."""
    names = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    return {**expert_mapping("mlp", config.num_experts, names), **LlamaForCausalLM.packed_modules_mapping}


def is_sparse_layer(config, layer: int) -> bool:
    """Whether decoder layer ``layer`` routes to experts rather than keeping a dense MLP."""
    return (layer not in config.mlp_only_layers and config.num_experts > 0
            and (layer + 1) % config.decoder_sparse_step == 0)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config, ops: Ops):
        super().__init__(config, ops)
        self.packed_modules_mapping = qwen_moe_packed_modules(config)

    def make_mlp(self, config, ops: Ops, layer: int) -> nn.Module:
        if not is_sparse_layer(config, layer):
            return super().make_mlp(config, ops, layer)
        shared = LlamaMLP(config.hidden_size, config.shared_expert_intermediate_size, ops)
        return SparseMoe(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                         config.num_experts_per_tok, ops, config.norm_topk_prob, round_weights=True,
                         shared_expert=shared)
