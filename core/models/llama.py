"""Llama-family decoder (Llama 2/3/3.1, SmolLM2); Mistral, Qwen2 and Qwen3 reuse it."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kvserve.core.distributed.parallel_state import pipeline_stage
from kvserve.core.layers.attention import Attention
from kvserve.core.layers.linear import GateUpLinear
from kvserve.core.layers.ops import Ops
from kvserve.core.layers.parallel import ParallelLMHead, RowParallelLinear, VocabParallelEmbedding, qkv_projection
from kvserve.core.layers.rotary import RotaryEmbedding, rope_parameters
from kvserve.plugins.interfaces import AttentionMetadata


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_size: int,
                 rotary_emb: RotaryEmbedding, qkv_bias: bool, ops: Ops, qk_norm_eps: float | None = None,
                 o_bias: bool = False, attention: dict | None = None):
        """``qk_norm_eps``: where given, each query and key head is RMS-normalized with it before rotary (Qwen3's
        q_norm and k_norm). ``o_bias``: the output projection has a bias (Llama's and Qwen3's attention_bias).
        ``attention``: keywords of the Attention layer (its sliding window; a scale other than 1/sqrt(head))."""
        super().__init__()
        self.qkv_proj, heads, kv_heads = qkv_projection(hidden_size, num_heads, num_kv_heads, head_size, qkv_bias)
        self.q_size, self.kv_size = heads * head_size, kv_heads * head_size   # this rank's
        self.o_proj = RowParallelLinear(num_heads * head_size, hidden_size, bias=o_bias)
        self.q_norm, self.k_norm = (None, None) if qk_norm_eps is None else (
            RMSNorm(head_size, qk_norm_eps, ops), RMSNorm(head_size, qk_norm_eps, ops))
        self.rotary_emb = rotary_emb
        self.attn = Attention(heads, kv_heads, head_size, **{"scale": head_size ** -0.5, **(attention or {})})

    def forward(self, angles: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = q.reshape(q.shape[0], -1, self.attn.head_size), k.reshape(k.shape[0], -1, self.attn.head_size)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(angles, q, k)
        return self.o_proj(self.attn(q, k, v, metadata))


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, ops: Ops):
        super().__init__()
        self.gate_up_proj = GateUpLinear(hidden_size, intermediate_size, ops.silu_and_mul)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))


class OtherStagesWeights:
    """The checkpoint names under these prefixes, which ``load_weights`` skips."""

    def __init__(self, prefixes: list[str]):
        self.prefixes = tuple(prefixes)

    def __contains__(self, name: str) -> bool:
        return name.startswith(self.prefixes)


def head_size_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, ops: Ops, qkv_bias: bool, rotary_emb: RotaryEmbedding, mlp: nn.Module,
                 qk_norm: bool = False, attention: dict | None = None):
        super().__init__()
        self.self_attn = LlamaAttention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                        head_size_of(config), rotary_emb, qkv_bias, ops,
                                        config.rms_norm_eps if qk_norm else None,
                                        bool(getattr(config, "attention_bias", False)), attention)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, angles, hidden, residual, metadata):
        hidden, residual = self.attend(angles, hidden, residual, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def attend(self, angles, hidden, residual, metadata):
        """Attention's output on the normalized stream, and the stream (residual, the layer's input added)."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return self.self_attn(angles, hidden, metadata), residual


class OnAnotherStage(nn.Module):
    """A decoder layer another pipeline stage holds: it keeps the layers' indices, and the checkpoint's names."""


class LlamaModel(nn.Module):
    def __init__(self, config, ops: Ops, make_layer: Callable[[int, RotaryEmbedding], nn.Module], embeds: bool):
        """``make_layer(layer, rotary_emb)``: decoder layer ``layer``, rotating by the shared ``rotary_emb``.
        ``embeds``: this pipeline stage needs the embedding (the first embeds the tokens; the last's output head
        may be tied to it)."""
        super().__init__()
        stage = pipeline_stage()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size) if embeds else None
        self.rotary_emb = RotaryEmbedding(head_size_of(config), config.max_position_embeddings,
                                          rope_parameters(config), ops)
        self.own_layers = stage.layers(config.num_hidden_layers)
        self.layers = nn.ModuleList(make_layer(layer, self.rotary_emb) if layer in self.own_layers
                                    else OnAnotherStage() for layer in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops) if stage.is_last else None

    def forward(self, input_ids, positions, metadata, intermediate=None):
        """The final hidden states; on a stage before the last, the (hidden, residual) it hands on. A stage after
        the first starts from the ``intermediate`` one the stage before it handed on."""
        hidden, residual = (self.embed_tokens(input_ids), None) if intermediate is None else intermediate
        angles = self.rotary_emb.angles(positions)   # the same for every layer: looked up once a step
        for layer in self.layers[self.own_layers.start:self.own_layers.stop]:
            hidden, residual = layer(angles, hidden, residual, metadata)
        if self.norm is None:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
    }
    qkv_bias = False
    qk_norm = False
    decoder_layer = LlamaDecoderLayer
    every_layer_slides = False   # the config's sliding_window, where it has one, is every layer's (Mistral)
    supports_pipeline_parallel = True
    supports_lora = True   # its projections are kvserve Linear layers that LoRA layers attach to
    eagle_target = True   # an EAGLE draft shares its model.embed_tokens and lm_head

    def __init__(self, config, ops: Ops):
        super().__init__()
        qkv_bias = self.qkv_bias or getattr(config, "attention_bias", False)
        if getattr(config, "mlp_bias", False):
            raise ValueError("mlp_bias=True Llama checkpoints are not supported")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # Every layer's, those of other pipeline stages included: blocks may be freed only out of all windows.
        self.layer_windows = [self.window_of(config, layer) for layer in range(config.num_hidden_layers)]
        stage = pipeline_stage()
        self.model = LlamaModel(
            config, ops, lambda layer, rotary_emb: self.decoder_layer(
                config, ops, qkv_bias, rotary_emb, self.make_mlp(config, ops, layer), self.qk_norm,
                self.attention_options(config, layer)),
            stage.is_first or (stage.is_last and self.tie_word_embeddings))
        self.lm_head = None if not stage.is_last else (
            ParallelLMHead.tied_to(self.model.embed_tokens) if self.tie_word_embeddings
            else ParallelLMHead(config.hidden_size, config.vocab_size))
        # What another pipeline stage holds: its layers, and the embedding, final norm and head where absent.
        self.ignored_weights = OtherStagesWeights(
            [f"model.layers.{i}." for i in range(config.num_hidden_layers) if i not in self.model.own_layers]
            + ["model.embed_tokens."] * (self.model.embed_tokens is None)
            + ["model.norm.", "lm_head."] * (self.lm_head is None))

    def attention_options(self, config, layer: int) -> dict:
        """Keywords of decoder layer ``layer``'s Attention: its sliding window, where it has one."""
        return {"sliding_window": self.layer_windows[layer]}

    def window_of(self, config, layer: int) -> int | None:
        """The config's sliding window, for the layers its layer_types calls sliding (Gemma 2, Qwen2 with
        use_sliding_window), or for every layer in models that slide every layer (Mistral)."""
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return config.sliding_window if layer_types[layer] == "sliding_attention" else None
        return getattr(config, "sliding_window", None) if self.every_layer_slides else None

    def make_mlp(self, config, ops: Ops, layer: int) -> nn.Module:
        """The feed-forward block of decoder layer ``layer``: a gated MLP; mixture-of-experts models route."""
        return LlamaMLP(config.hidden_size, config.intermediate_size, ops)

    def tie_weights(self) -> None:
        """Share the embedding with lm_head again: materializing the model off the meta device unties them."""
        if self.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        return self.model(input_ids, positions, metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    every_layer_slides = True
