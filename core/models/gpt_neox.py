"""GPT-NeoX (Pythia): LayerNorm before attention and a GELU MLP, the two side by side on each layer's input
(``use_parallel_residual``) or one after the other; rotary on the first ``partial_rotary_factor`` (``rotary_pct``)
of each head; q/k/v fused per head. Falcon is this decoder with other settings and checkpoint names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from kvserve.core.distributed.parallel_state import pipeline_stage
from kvserve.core.layers.activation import activation
from kvserve.core.layers.attention import Attention
from kvserve.core.layers.grouped_qkv import GroupedQKVLinear
from kvserve.core.layers.ops import Ops
from kvserve.core.layers.parallel import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from kvserve.core.layers.rotary import RotaryEmbedding, rope_parameters
from kvserve.core.models.llama import OnAnotherStage, OtherStagesWeights
from kvserve.plugins.interfaces import AttentionMetadata


@dataclass(frozen=True)
class LayerSettings:
    """What each decoder layer takes from a checkpoint's config, whose fields GPT-NeoX and Falcon name apart."""

    num_kv_heads: int
    intermediate_size: int
    act: nn.Module
    eps: float
    attention_bias: bool
    mlp_bias: bool
    parallel: bool   # attention and MLP side by side on the layer's input, else the MLP after the attention
    mlp_norm: bool   # the MLP normalizes its input itself; else (side by side) it takes the attention's


class GPTNeoXAttention(nn.Module):
    """Rotary attention whose q/k/v projection the checkpoint fuses with its heads grouped (GroupedQKVLinear), and
    the output projection (``dense``)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, bias: bool,
                 rotary_emb: RotaryEmbedding):
        super().__init__()
        head_size = hidden_size // num_heads
        self.query_key_value = GroupedQKVLinear(hidden_size, num_heads, num_kv_heads, head_size, bias)
        self.dense = RowParallelLinear(hidden_size, hidden_size, bias=bias)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.query_key_value.num_heads, self.query_key_value.num_kv_heads, head_size,
                              scale=head_size ** -0.5)

    def forward(self, angles: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.query_key_value.split(self.query_key_value(hidden))
        q, k = self.rotary_emb(angles, q, k)
        return self.dense(self.attn(q, k, v, metadata))


class GPTNeoXMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: nn.Module, bias: bool):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(hidden_size, intermediate_size, bias=bias)
        self.act = act
        self.dense_4h_to_h = RowParallelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config, settings: LayerSettings, rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden = config.hidden_size
        self.parallel = settings.parallel
        self.input_layernorm = nn.LayerNorm(hidden, eps=settings.eps)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=settings.eps) if settings.mlp_norm else None
        self.attention = GPTNeoXAttention(hidden, config.num_attention_heads, settings.num_kv_heads,
                                          settings.attention_bias, rotary_emb)
        self.mlp = GPTNeoXMLP(hidden, settings.intermediate_size, settings.act, settings.mlp_bias)

    def forward(self, angles, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        # Summed in transformers' order, so that float32 results match it.
        normed = self.input_layernorm(hidden)
        attended = self.attention(angles, normed, metadata)
        if not self.parallel:
            hidden = attended + hidden
            return self.mlp(self.post_attention_layernorm(hidden)) + hidden
        mlp_input = normed if self.post_attention_layernorm is None else self.post_attention_layernorm(hidden)
        return self.mlp(mlp_input) + attended + hidden


class GPTNeoXModel(nn.Module):
    def __init__(self, config, settings: LayerSettings, rotary_dims: int, ops: Ops, embeds: bool):
        """``rotary_dims``: the leading dimensions of each head that rotary turns. ``embeds``: this pipeline stage
        needs the token embedding (the first; the last where the head is tied to it)."""
        super().__init__()
        stage = pipeline_stage()
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size) if embeds else None
        self.rotary_emb = RotaryEmbedding(rotary_dims, config.max_position_embeddings, rope_parameters(config), ops)
        self.own_layers = stage.layers(config.num_hidden_layers)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, settings, self.rotary_emb) if layer in self.own_layers
                                    else OnAnotherStage() for layer in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=settings.eps) if stage.is_last else None

    def forward(self, input_ids, positions, metadata, intermediate=None):
        """The final hidden states; on a stage before the last, the (hidden,) it hands on."""
        hidden = self.embed_in(input_ids) if intermediate is None else intermediate[0]
        angles = self.rotary_emb.angles(positions)   # the same for every layer: looked up once a step
        for layer in self.layers[self.own_layers.start:self.own_layers.stop]:
            hidden = layer(angles, hidden, metadata)
        return (hidden,) if self.final_layer_norm is None else self.final_layer_norm(hidden)


class GPTNeoXForCausalLM(nn.Module):
    supports_pipeline_parallel = True

    def __init__(self, config, ops: Ops):
        super().__init__()
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        stage = pipeline_stage()
        head_size = config.hidden_size // config.num_attention_heads
        rotary_dims = int(head_size * rope_parameters(config).get("partial_rotary_factor", 1.0))
        self.gpt_neox = GPTNeoXModel(config, self.layer_settings(config), rotary_dims, ops,
                                     stage.is_first or (stage.is_last and self.tie_word_embeddings))
        self.embed_out = None if not stage.is_last else (
            ParallelLMHead.tied_to(self.gpt_neox.embed_in) if self.tie_word_embeddings
            else ParallelLMHead(config.hidden_size, config.vocab_size))
        # What another pipeline stage holds: its layers, and the embedding, final norm and head where absent.
        self.ignored_weights = OtherStagesWeights(
            [f"gpt_neox.layers.{i}." for i in range(config.num_hidden_layers) if i not in self.gpt_neox.own_layers]
            + ["gpt_neox.embed_in."] * (self.gpt_neox.embed_in is None)
            + ["gpt_neox.final_layer_norm.", "embed_out."] * (self.embed_out is None))

    @staticmethod
    def layer_settings(config) -> LayerSettings:
        return LayerSettings(num_kv_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
                             act=activation(config.hidden_act, "hidden_act"), eps=config.layer_norm_eps,
                             attention_bias=bool(config.attention_bias), mlp_bias=True,
                             parallel=bool(config.use_parallel_residual), mlp_norm=True)

    def map_checkpoint(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint without the causal masks that older ones keep (``attention.bias``, ``.masked_bias``), nor
        a tied head's float copy of the embedding (a quantized one, GGUF's blocks, the head runs as it is)."""
        return ((name, tensor) for name, tensor in weights
                if not name.endswith((".attention.bias", ".attention.masked_bias"))
                and not (self.tie_word_embeddings and name == "embed_out.weight" and isinstance(tensor, torch.Tensor)))

    def tie_weights(self) -> None:
        """Share the embedding with the head again: materializing the model off the meta device unties them."""
        if self.tie_word_embeddings and self.embed_out is not None:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                intermediate: tuple[torch.Tensor] | None = None):
        return self.gpt_neox(input_ids, positions, metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embed_out(hidden)
