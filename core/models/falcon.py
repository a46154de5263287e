"""Falcon: GPT-NeoX's decoder (core/models/gpt_neox.py) with Falcon's settings and checkpoint names. Falcon-7B's
attention (``multi_query``: one key-value head) and MLP side by side on one norm (``parallel_attn``), or one after
the other; Falcon-40B's ``new_decoder_architecture``: ``num_kv_heads`` grouped key-value heads, attention and MLP
always side by side, with a norm each (``ln_attn``, ``ln_mlp``) or one (``num_ln_in_parallel_attn=1``); biases on
every projection or none (``bias``)."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from kvserve.core.layers.activation import activation
from kvserve.core.models.gpt_neox import GPTNeoXForCausalLM, LayerSettings

# Falcon's checkpoint names, and GPT-NeoX's for the same tensors.
CHECKPOINT_NAMES = (("transformer.h.", "gpt_neox.layers."), ("transformer.word_embeddings.", "gpt_neox.embed_in."),
                    ("transformer.ln_f.", "gpt_neox.final_layer_norm."), ("lm_head.", "embed_out."),
                    (".self_attention.", ".attention."), (".ln_attn.", ".input_layernorm."),
                    (".ln_mlp.", ".post_attention_layernorm."))


class FalconForCausalLM(GPTNeoXForCausalLM):
    @staticmethod
    def layer_settings(config) -> LayerSettings:
        if config.alibi:
            raise ValueError("Falcon checkpoints with alibi=True are not supported; allowed: alibi=False (rotary "
                             "position embeddings)")
        new_architecture = bool(config.new_decoder_architecture)
        parallel = new_architecture or bool(config.parallel_attn)
        norms = config.num_ln_in_parallel_attn or (2 if new_architecture else 1)
        if parallel and norms not in (1, 2):
            raise ValueError(f"num_ln_in_parallel_attn={norms} is not supported; allowed: 1, 2")
        kv_heads = config.num_kv_heads if new_architecture else 1 if config.multi_query else config.num_attention_heads
        return LayerSettings(num_kv_heads=kv_heads, intermediate_size=config.ffn_hidden_size,
                             act=activation(config.activation, "activation"), eps=config.layer_norm_epsilon,
                             attention_bias=bool(config.bias), mlp_bias=bool(config.bias), parallel=parallel,
                             mlp_norm=not parallel or norms == 2)

    def map_checkpoint(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        return super().map_checkpoint((neox_name(name), tensor) for name, tensor in weights)


def neox_name(falcon_name: str) -> str:
    for falcon, neox in CHECKPOINT_NAMES:
        falcon_name = falcon_name.replace(falcon, neox)
    return falcon_name
