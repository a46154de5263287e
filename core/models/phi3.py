"""Phi-3, Phi-3.5 and Phi-4-mini: Mistral's decoder (a sliding window over the whole model where the config sets
one) with the checkpoint's q/k/v and gate/up projections each fused in one tensor, and rotary over the first
``partial_rotary_factor`` of each head (Phi-4-mini: 0.75), longrope-scaled in the long-context checkpoints."""
from __future__ import annotations

import copy

from kvserve.core.layers.ops import Ops
from kvserve.core.layers.rotary import RotaryEmbedding, rope_parameters
from kvserve.core.models.llama import MistralForCausalLM, head_size_of


class Phi3ForCausalLM(MistralForCausalLM):
    """Mistral's decoder that loads Phi-3's fused tensors, split per rank by the loader, with its own rotary."""

    packed_modules_mapping = {"qkv_proj": ("qkv_proj", ("q", "k", "v")),
                              "gate_up_proj": ("gate_up_proj", ("gate", "up"))}

    def __init__(self, config, ops: Ops):
        if config.hidden_act != "silu":
            raise ValueError(f"Phi-3 checkpoints with hidden_act={config.hidden_act!r} are not supported; "
                             f"allowed: 'silu'")
        params = rope_parameters(config)
        factor = params.get("partial_rotary_factor", 1.0)
        if not 0 < factor <= 1:
            raise ValueError(f"partial_rotary_factor={factor} is not supported; allowed: above 0, at most 1")
        # The Llama decoder's rotary turns whole heads, where longrope's factors (one per rotary pair) do not fit:
        # it is built with plain rope, then every layer gets the rotary over the first rotary_dim of each head.
        whole_heads = copy.copy(config)
        whole_heads.rope_parameters = {"rope_type": "default", "rope_theta": params["rope_theta"]}
        super().__init__(whole_heads, ops)
        rotary = RotaryEmbedding(int(head_size_of(config) * factor), config.max_position_embeddings, params, ops)
        self.model.rotary_emb = rotary
        for layer in self.model.layers[self.model.own_layers.start:self.model.own_layers.stop]:
            layer.self_attn.rotary_emb = rotary
