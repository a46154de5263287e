"""Mixtral: Mistral's decoder with a sparse mixture of experts in place of each layer's MLP, each token taking the
``num_experts_per_tok`` most likely of ``num_local_experts``, their weights renormalized."""
from __future__ import annotations

from torch import nn

from kvserve.core.layers.moe import SparseMoe, expert_mapping
from kvserve.core.layers.ops import Ops
from kvserve.core.models.llama import LlamaForCausalLM, MistralForCausalLM


class MixtralForCausalLM(MistralForCausalLM):
    def __init__(self, config, ops: Ops):
        super().__init__(config, ops)
        experts = expert_mapping("block_sparse_moe", config.num_local_experts, {"w1": "gate", "w3": "up", "w2": "down"})
        self.packed_modules_mapping = {**experts, "block_sparse_moe.gate": ("mlp.gate", None),
                                       **LlamaForCausalLM.packed_modules_mapping}

    def make_mlp(self, config, ops: Ops, layer: int) -> nn.Module:
        return SparseMoe(config.hidden_size, config.intermediate_size, config.num_local_experts,
                         config.num_experts_per_tok, ops, normalize=True)
