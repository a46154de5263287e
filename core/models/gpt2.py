"""GPT-2: learned absolute positions, pre-norm LayerNorm blocks, a fused q/k/v projection (``c_attn``) and a GELU
MLP, all with biases; Conv1D checkpoints whose weights are stored transposed ([in, out]); the head tied to the
token embedding."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from kvserve.core.distributed.parallel_state import pipeline_stage
from kvserve.core.layers.activation import activation
from kvserve.core.layers.attention import Attention
from kvserve.core.layers.embedding import LearnedPositionEmbedding
from kvserve.core.layers.ops import Ops
from kvserve.core.layers.parallel import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                                          VocabParallelEmbedding, qkv_projection)
from kvserve.core.models.llama import OnAnotherStage, OtherStagesWeights
from kvserve.plugins.interfaces import AttentionMetadata

# Options that change GPT-2's math in ways kvserve does not compute, each allowed only at its default.
UNSUPPORTED = {"reorder_and_upcast_attn": False, "add_cross_attention": False}
CONV1D_MODULES = (".c_attn.", ".c_proj.", ".c_fc.")


class GPT2Attention(nn.Module):
    """Multi-head attention without rotary: one fused q/k/v projection (``c_attn``) and the output projection
    (``c_proj``), with biases where ``bias``; OPT's attention too."""

    def __init__(self, hidden_size: int, num_heads: int, bias: bool, scale: float):
        super().__init__()
        head_size = hidden_size // num_heads
        self.c_attn, heads, _ = qkv_projection(hidden_size, num_heads, num_heads, head_size, bias)
        self.c_proj = RowParallelLinear(hidden_size, hidden_size, bias=bias)
        self.attn = Attention(heads, heads, head_size, scale)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(hidden).chunk(3, dim=-1)
        return self.c_proj(self.attn(q, k, v, metadata))


class GPT2MLP(nn.Module):
    def __init__(self, hidden_size: int, inner_size: int, act: nn.Module):
        super().__init__()
        self.c_fc = ColumnParallelLinear(hidden_size, inner_size, bias=True)
        self.c_proj = RowParallelLinear(inner_size, hidden_size, bias=True)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


def attention_scale(config, layer: int) -> float:
    """1 / sqrt(head size) (1 without ``scale_attn_weights``), divided by layer + 1 with
    ``scale_attn_by_inverse_layer_idx``."""
    scale = (config.hidden_size // config.num_attention_heads) ** -0.5 if config.scale_attn_weights else 1.0
    return scale / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scale


class GPT2Block(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(hidden, config.num_attention_heads, True, attention_scale(config, layer))
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(hidden, config.n_inner or 4 * hidden,
                           activation(config.activation_function, "activation_function"))

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), metadata)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, config, embeds: bool):
        """``embeds``: this pipeline stage needs the token embedding (the first; the last where the head is tied
        to it)."""
        super().__init__()
        stage = pipeline_stage()
        hidden = config.hidden_size
        self.wte = VocabParallelEmbedding(config.vocab_size, hidden) if embeds else None
        self.wpe = LearnedPositionEmbedding(config.max_position_embeddings, hidden) if stage.is_first else None
        self.own_layers = stage.layers(config.num_hidden_layers)
        self.h = nn.ModuleList(GPT2Block(config, layer) if layer in self.own_layers else OnAnotherStage()
                               for layer in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon) if stage.is_last else None

    def forward(self, input_ids, positions, metadata, intermediate=None):
        """The final hidden states; on a stage before the last, the (hidden,) it hands on."""
        hidden = self.wte(input_ids) + self.wpe(positions) if intermediate is None else intermediate[0]
        for block in self.h[self.own_layers.start:self.own_layers.stop]:
            hidden = block(hidden, metadata)
        return (hidden,) if self.ln_f is None else self.ln_f(hidden)


class GPT2LMHeadModel(nn.Module):
    packed_modules_mapping = {"c_attn": ("c_attn", ("q", "k", "v"))}
    supports_pipeline_parallel = True

    def __init__(self, config, ops: Ops):
        super().__init__()
        for field, default in UNSUPPORTED.items():
            if getattr(config, field, default) != default:
                raise ValueError(f"GPT-2 checkpoints with {field}={getattr(config, field)!r} are not supported; "
                                 f"allowed: {default}")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        stage = pipeline_stage()
        self.transformer = GPT2Model(config, stage.is_first or (stage.is_last and self.tie_word_embeddings))
        self.lm_head = None if not stage.is_last else (
            ParallelLMHead.tied_to(self.transformer.wte) if self.tie_word_embeddings
            else ParallelLMHead(config.hidden_size, config.vocab_size))
        # What another pipeline stage holds: its blocks, and the embeddings, final norm and head where absent.
        self.ignored_weights = OtherStagesWeights(
            [f"transformer.h.{i}." for i in range(config.num_hidden_layers) if i not in self.transformer.own_layers]
            + ["transformer.wte."] * (self.transformer.wte is None) + ["transformer.wpe."] * (not stage.is_first)
            + ["transformer.ln_f.", "lm_head."] * (self.lm_head is None))

    @staticmethod
    def map_checkpoint(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """transformers' names for the checkpoints that OpenAI's GPT-2 ships without the ``transformer.`` prefix,
        without their causal masks (``attn.bias``, ``attn.masked_bias``), and each Conv1D weight as the [out, in]
        of a linear layer."""
        for name, tensor in weights:
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if not name.startswith(("transformer.", "lm_head.")):
                name = f"transformer.{name}"
            conv1d = name.endswith(".weight") and any(module in name for module in CONV1D_MODULES)
            yield name, tensor.t() if conv1d and isinstance(tensor, torch.Tensor) else tensor

    def tie_weights(self) -> None:
        """Share the embedding with lm_head again: materializing the model off the meta device unties them."""
        if self.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                intermediate: tuple[torch.Tensor] | None = None):
        return self.transformer(input_ids, positions, metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
