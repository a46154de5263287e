"""OPT: GPT-2's attention (separate q/k/v projections in the checkpoint) and a two-layer MLP, LayerNorm before each
(``do_layer_norm_before``) or after its residual sum (OPT-350m), learned positions offset by 2, and token
embeddings of ``word_embed_proj_dim`` projected in and out (``project_in``, ``project_out``) where that is not the
hidden size."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from kvserve.core.distributed.parallel_state import pipeline_stage
from kvserve.core.layers.activation import activation
from kvserve.core.layers.embedding import LearnedPositionEmbedding
from kvserve.core.layers.linear import Linear
from kvserve.core.layers.ops import Ops
from kvserve.core.layers.parallel import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from kvserve.core.models.gpt2 import GPT2Attention
from kvserve.core.models.llama import OnAnotherStage, OtherStagesWeights
from kvserve.plugins.interfaces import AttentionMetadata

POSITION_OFFSET = 2   # OPT's position table keeps two rows before position 0's


class OPTDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, bias, affine = config.hidden_size, config.enable_bias, config.layer_norm_elementwise_affine
        self.norm_before = config.do_layer_norm_before
        self.self_attn = GPT2Attention(hidden, config.num_attention_heads, bias,
                                       (hidden // config.num_attention_heads) ** -0.5)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(hidden, config.ffn_dim, bias=bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, bias=bias)
        self.act = activation(config.activation_function, "activation_function")
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.residual(hidden, self.self_attn_layer_norm, lambda x: self.self_attn(x, metadata))
        return self.residual(hidden, self.final_layer_norm, lambda x: self.fc2(self.act(self.fc1(x))))

    def residual(self, x: torch.Tensor, norm: nn.LayerNorm, block: Callable[[torch.Tensor], torch.Tensor]):
        """``x`` plus ``block`` of it, normalized on the way into the block or, without do_layer_norm_before,
        after the sum."""
        return x + block(norm(x)) if self.norm_before else norm(x + block(x))


class OPTDecoder(nn.Module):
    def __init__(self, config, embeds: bool):
        """``embeds``: this pipeline stage needs the token embedding (the first; the last where the head is tied
        to it)."""
        super().__init__()
        stage = pipeline_stage()
        hidden, width = config.hidden_size, config.word_embed_proj_dim
        projects = width != hidden
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, width) if embeds else None
        self.embed_positions = LearnedPositionEmbedding(config.max_position_embeddings, hidden,
                                                        POSITION_OFFSET) if stage.is_first else None
        self.project_in = Linear(width, hidden, bias=False) if projects and stage.is_first else None
        self.own_layers = stage.layers(config.num_hidden_layers)
        self.layers = nn.ModuleList(OPTDecoderLayer(config) if layer in self.own_layers else OnAnotherStage()
                                    for layer in range(config.num_hidden_layers))
        final_norm = stage.is_last and config.do_layer_norm_before and not config._remove_final_layer_norm
        self.final_layer_norm = (nn.LayerNorm(hidden, elementwise_affine=config.layer_norm_elementwise_affine)
                                 if final_norm else None)
        self.project_out = Linear(hidden, width, bias=False) if projects and stage.is_last else None

    def forward(self, input_ids, positions, metadata, intermediate=None):
        """The final hidden states, of ``word_embed_proj_dim``; on a stage before the last, the (hidden,) it hands
        on."""
        if intermediate is None:
            embeds = self.embed_tokens(input_ids)
            hidden = (embeds if self.project_in is None else self.project_in(embeds)) + self.embed_positions(positions)
        else:
            hidden = intermediate[0]
        for layer in self.layers[self.own_layers.start:self.own_layers.stop]:
            hidden = layer(hidden, metadata)
        if not pipeline_stage().is_last:
            return (hidden,)
        hidden = hidden if self.final_layer_norm is None else self.final_layer_norm(hidden)
        return hidden if self.project_out is None else self.project_out(hidden)


class OPTForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("c_attn", "q"), "k_proj": ("c_attn", "k"), "v_proj": ("c_attn", "v"), "out_proj": ("c_proj", None),
    }
    supports_pipeline_parallel = True

    def __init__(self, config, ops: Ops):
        super().__init__()
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        stage = pipeline_stage()
        self.decoder = OPTDecoder(config, stage.is_first or (stage.is_last and self.tie_word_embeddings))
        self.lm_head = None if not stage.is_last else (
            ParallelLMHead.tied_to(self.decoder.embed_tokens) if self.tie_word_embeddings
            else ParallelLMHead(config.word_embed_proj_dim, config.vocab_size))
        # What another pipeline stage holds: its layers, and the embeddings, projections, final norm and head.
        first, last = ["decoder.embed_positions.", "decoder.project_in."], ["decoder.final_layer_norm.",
                                                                          "decoder.project_out.", "lm_head."]
        self.ignored_weights = OtherStagesWeights(
            [f"decoder.layers.{i}." for i in range(config.num_hidden_layers) if i not in self.decoder.own_layers]
            + ["decoder.embed_tokens."] * (self.decoder.embed_tokens is None)
            + first * (not stage.is_first) + last * (not stage.is_last))

    @staticmethod
    def map_checkpoint(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The decoder's names without transformers' ``model.`` prefix, which the checkpoints Meta shipped lack."""
        for name, tensor in weights:
            yield name.removeprefix("model."), tensor

    def tie_weights(self) -> None:
        """Share the embedding with lm_head again: materializing the model off the meta device unties them."""
        if self.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.decoder.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                intermediate: tuple[torch.Tensor] | None = None):
        return self.decoder(input_ids, positions, metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
