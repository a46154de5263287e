"""BERT-family encoders (BertModel, as sentence-transformers checkpoints such as all-MiniLM-L6-v2 save it): word,
position and token-type embeddings with a LayerNorm, then post-norm encoder layers of bidirectional attention and a
GELU MLP. There is no language-model head: the engine pools the final hidden states into embeddings
(core/layers/pooler.py)."""
from __future__ import annotations

import torch
from torch import nn

from kvserve.core.layers.activation import activation
from kvserve.core.layers.embedding import LearnedPositionEmbedding
from kvserve.core.layers.encoder_attention import EncoderAttention
from kvserve.core.layers.ops import Ops
from kvserve.core.layers.parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, qkv_projection
from kvserve.plugins.interfaces import AttentionMetadata


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = LearnedPositionEmbedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Every token is of type 0: a prompt is one text, not a pair of segments.
        hidden = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
                  + self.token_type_embeddings.weight[0])
        return self.LayerNorm(hidden)


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        heads, head_size = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        self.qkv_proj, own_heads, _ = qkv_projection(config.hidden_size, heads, heads, head_size, bias=True)
        self.size = own_heads * head_size   # this rank's
        self.attn = EncoderAttention(own_heads, own_heads, head_size, scale=head_size ** -0.5)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.size] * 3, dim=-1)
        return self.attn(q, k, v, metadata)


class BertOutput(nn.Module):
    """A row-parallel projection back to the hidden size, added to the block's input, then the LayerNorm."""

    def __init__(self, in_features: int, hidden_size: int, eps: float):
        super().__init__()
        self.dense = RowParallelLinear(in_features, hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertOutput(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        return self.output(self.self(hidden, metadata), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.activation = activation(config.hidden_act, "hidden_act")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden))


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.attention(hidden, metadata)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """The encoder's final hidden state of every token; a pooling model, never a generative one."""

    packed_modules_mapping = {"query": ("qkv_proj", "q"), "key": ("qkv_proj", "k"), "value": ("qkv_proj", "v")}
    is_pooling_model = True
    default_pooling_type = "CLS"   # vLLM's for BERT, where no sentence-transformers files say otherwise

    def __init__(self, config, ops: Ops):
        super().__init__()
        for name, allowed in (("position_embedding_type", "absolute"), ("is_decoder", False)):
            if getattr(config, name, allowed) != allowed:
                raise ValueError(f"BERT checkpoints with {name}={getattr(config, name)!r} are not supported; "
                                 f"allowed: {allowed!r}")
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        # A buffer saved with the weights, and the next-sentence pooler, which sentence embeddings do not use.
        self.ignored_weights = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embeddings(input_ids, positions)
        for layer in self.encoder.layer:
            hidden = layer(hidden, metadata)
        return hidden
