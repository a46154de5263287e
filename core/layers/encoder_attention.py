"""Bidirectional attention for encoder-only models: each prompt of a step's flat batch attends over all of its own
tokens. Nothing is cached: an encoder computes a prompt once, whole, in one step."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.core.layers.attention import Attention
from kvserve.plugins.interfaces import AttentionMetadata


class EncoderAttention(Attention):
    """An Attention layer (so that the model runner builds the step's metadata for it) that ignores the paged
    backend: the step's prompts are padded to the longest and run through torch's scaled_dot_product_attention,
    every query seeing every key of its own prompt."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        starts = metadata.query_start_loc.long()
        lengths = starts[1:] - starts[:-1]
        num_tokens, num_prompts, width = q.shape[0], len(lengths), metadata.max_query_len
        prompt_of = torch.repeat_interleave(torch.arange(num_prompts, device=q.device), lengths,
                                            output_size=num_tokens)
        place = torch.arange(num_tokens, device=q.device) - starts[prompt_of]

        def padded(x: torch.Tensor, heads: int) -> torch.Tensor:   # [prompts, heads, width, head_size]
            out = x.new_zeros(num_prompts, width, heads, self.head_size)
            out[prompt_of, place] = x.view(num_tokens, heads, self.head_size)
            return out.transpose(1, 2)

        real_keys = torch.arange(width, device=q.device) < lengths[:, None]
        out = F.scaled_dot_product_attention(padded(q, self.num_heads), padded(k, self.num_kv_heads),
                                             padded(v, self.num_kv_heads), attn_mask=real_keys[:, None, None, :],
                                             scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads)
        return out.transpose(1, 2)[prompt_of, place].reshape(num_tokens, self.num_heads * self.head_size)
