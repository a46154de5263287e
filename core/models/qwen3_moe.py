"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's decoder whose sparse layers route each token to
``num_experts_per_tok`` of ``num_experts`` experts (renormalized with ``norm_topk_prob``), without Qwen2-MoE's
shared expert; the layers in ``mlp_only_layers`` or off the ``decoder_sparse_step`` keep a dense MLP."""
from __future__ import annotations

from torch import nn

from kvserve.core.layers.moe import SparseMoe
from kvserve.core.layers.ops import Ops
from kvserve.core.models.qwen2_moe import is_sparse_layer, qwen_moe_packed_modules
from kvserve.core.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config, ops: Ops):
        super().__init__(config, ops)
        self.packed_modules_mapping = qwen_moe_packed_modules(config)

    def make_mlp(self, config, ops: Ops, layer: int) -> nn.Module:
        if not is_sparse_layer(config, layer):
            return super().make_mlp(config, ops, layer)
        return SparseMoe(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                         config.num_experts_per_tok, ops, config.norm_topk_prob, round_weights=True)
