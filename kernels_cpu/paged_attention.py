"""Paged attention in plain torch: works on any device, used by the CPU platform."""
from __future__ import annotations

import torch


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write [tokens, kv_heads, head] keys and values into a [2, blocks, block_size, kv_heads, head] cache."""
    num_kv_heads, head_size = key.shape[1:]
    kv_cache[0].view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def varlen_paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                           seq_lens: torch.Tensor, block_tables: torch.Tensor, max_query_len: int,
                           max_seq_len: int, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    query: [tokens, heads, head] for the sequences of ``query_start_loc``; the last query of a
    sequence sits at position seq_len - 1. Sequences are padded to the longest query and context
    of the group, so callers group sequences of similar query length (decodes apart from prefills).
    """
    num_seqs = seq_lens.shape[0]
    num_tokens, num_heads, head_size = query.shape
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=query.device), query_lens,
                                           output_size=num_tokens)
    row_of_token = torch.arange(num_tokens, device=query.device) - query_start_loc[seq_of_token]

    padded_q = query.new_zeros(num_seqs, max_query_len, num_heads, head_size)
    padded_q[seq_of_token, row_of_token] = query

    num_kv_heads = kv_cache.shape[3]
    keys = kv_cache[0][block_tables].view(num_seqs, -1, num_kv_heads, head_size)[:, :max_seq_len]
    values = kv_cache[1][block_tables].view(num_seqs, -1, num_kv_heads, head_size)[:, :max_seq_len]

    query_pos = (seq_lens - query_lens)[:, None] + torch.arange(max_query_len, device=query.device)
    key_pos = torch.arange(keys.shape[1], device=query.device)
    distance = query_pos[:, :, None] - key_pos[None, None, :]
    mask = distance >= 0
    if sliding_window is not None:
        mask &= distance < sliding_window

    out = torch.nn.functional.scaled_dot_product_attention(
        padded_q.transpose(1, 2), keys.transpose(1, 2).to(query.dtype), values.transpose(1, 2).to(query.dtype),
        attn_mask=mask[:, None], scale=scale, enable_gqa=num_heads != num_kv_heads)
    return out.transpose(1, 2)[seq_of_token, row_of_token]
