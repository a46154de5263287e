"""Gemma 2: Gemma with norms after attention and around the feed-forward block, layers that alternate a sliding
window with global attention, attention scores and logits soft-capped (cap * tanh(x / cap)), and queries scaled by
query_pre_attn_scalar rather than the head size."""
from __future__ import annotations

import torch

from kvserve.core.layers.ops import Ops
from kvserve.core.models.gemma import GemmaDecoderLayer, GemmaForCausalLM, gemma_norm


class Gemma2DecoderLayer(GemmaDecoderLayer):
    def __init__(self, config, ops: Ops, *args, **kwargs):
        super().__init__(config, ops, *args, **kwargs)
        self.pre_feedforward_layernorm = gemma_norm(config, ops)
        self.post_feedforward_layernorm = gemma_norm(config, ops)

    def forward(self, angles, hidden, residual, metadata):
        hidden, residual = self.attend(angles, hidden, residual, metadata)
        hidden, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(hidden), residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2ForCausalLM(GemmaForCausalLM):
    decoder_layer = Gemma2DecoderLayer

    def __init__(self, config, ops: Ops):
        super().__init__(config, ops)
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    def attention_options(self, config, layer: int) -> dict:
        return {**super().attention_options(config, layer), "scale": config.query_pre_attn_scalar ** -0.5,
                "logits_soft_cap": getattr(config, "attn_logit_softcapping", None)}

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
