"""EAGLE's draft for a Llama-family target (EAGLE-1, as SafeAILab publishes it and vLLM loads it): the embedding
of each token and the target's last hidden state before it, concatenated and projected (``fc``), then Llama
decoder layers, the first without its input norm, and no final norm; the target's head gives its logits.

Checkpoint names: ``fc.weight`` (and ``fc.bias`` where it has one), ``layers.{i}.…`` as in a Llama model. The
target's embedding is shared: a checkpoint's ``embed_tokens.weight``, a frozen copy of it, is not read.
"""
from __future__ import annotations

import torch
from torch import nn

from kvserve.core.layers.linear import Linear
from kvserve.core.layers.ops import Ops
from kvserve.core.layers.rotary import RotaryEmbedding, rope_parameters
from kvserve.core.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, head_size_of
from kvserve.plugins.interfaces import AttentionMetadata


class EagleLlama(nn.Module):
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    ignored_weights = ("embed_tokens.weight",)

    def __init__(self, config, ops: Ops, fc_bias: bool, qkv_bias: bool):
        super().__init__()
        self.fc = Linear(2 * config.hidden_size, config.hidden_size, bias=fc_bias)
        self.rotary_emb = RotaryEmbedding(head_size_of(config), config.max_position_embeddings,
                                          rope_parameters(config), ops)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, ops, qkv_bias, self.rotary_emb,
                              LlamaMLP(config.hidden_size, config.intermediate_size, ops))
            for _ in range(config.num_hidden_layers))
        self.layers[0].input_layernorm = nn.Identity()
        self.embed_tokens: nn.Embedding | None = None
        self.lm_head: nn.Module | None = None

    def share(self, target: nn.Module) -> None:
        """Take the target's embedding and head, once the draft's own weights are loaded."""
        self.embed_tokens, self.lm_head = target.model.embed_tokens, target.lm_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                features: torch.Tensor) -> torch.Tensor:
        """``features``: the hidden state before each token, the target's or, past its last, the draft's."""
        hidden, residual = self.fc(torch.cat((self.embed_tokens(input_ids), features), dim=-1)), None
        angles = self.rotary_emb.angles(positions)
        for layer in self.layers:
            hidden, residual = layer(angles, hidden, residual, metadata)
        return hidden + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
