"""Paged attention in plain torch, used by the CPU platform.

The cache keeps each kv head's blocks together, [2, kv_heads, blocks, block_size, head], so that gathering a
batch's blocks yields [kv_heads, seqs, tokens, head]: the operand a batched matmul takes without a copy.
"""
from __future__ import annotations

import torch


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
    return (2, num_kv_heads, num_blocks, block_size, head_size)


def to_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``x`` as a cache of ``dtype`` holds it: an FP8 cache's fp8(x / scale), saturated at the type's largest value."""
    if dtype.itemsize != 1:
        return x.to(dtype)
    top = torch.finfo(dtype).max
    return (x.float() / scale).clamp_(-top, top).to(dtype)


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """Write [tokens, kv_heads, head] keys and values into their cache slots (block * block_size + offset)."""
    num_kv_heads, head_size = key.shape[1:]
    for part, new, scale in ((kv_cache[0], key, kv_scales[0]), (kv_cache[1], value, kv_scales[1])):
        new = to_cache(new.transpose(0, 1), part.dtype, scale)
        if part.dtype.itemsize == 1:   # torch's CPU index_copy_ has no FP8 kernel: the same bytes as uint8
            part, new = part.view(torch.uint8), new.view(torch.uint8)
        part.view(num_kv_heads, -1, head_size).index_copy_(1, slot_mapping, new)


def gather_context(cache_part: torch.Tensor, block_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """[kv_heads, blocks, block_size, head] -> [kv_heads, num_seqs, tokens, head]; ``block_ids`` holds each
    sequence's block table, flattened, all of one width."""
    num_kv_heads, num_blocks, _, head_size = cache_part.shape
    # index_select copies whole rows far faster when a block is one flat row.
    rows = cache_part.view(num_kv_heads, num_blocks, -1).index_select(1, block_ids)
    return rows.view(num_kv_heads, num_seqs, -1, head_size)


def allowed_keys(seq_lens: torch.Tensor, query_lens: torch.Tensor, max_query_len: int, num_keys: int,
                 sliding_window: int | None) -> torch.Tensor:
    """[seqs, max_query_len, num_keys] True where a (padded) query may attend a key: causal, within the window.
    A sequence's last query sits at position seq_len - 1."""
    device = seq_lens.device
    query_pos = (seq_lens - query_lens)[:, None] + torch.arange(max_query_len, device=device)
    distance = query_pos[:, :, None] - torch.arange(num_keys, device=device)
    allowed = distance >= 0
    if sliding_window is not None:
        allowed &= distance < sliding_window
    return allowed


def decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, bias: torch.Tensor,
                     scale: float, kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """One query per sequence, [seqs, heads, head], over its cached context; ``bias`` [seqs, 1, keys] is 0 for
    the keys it attends and -inf for the rest. Scores and softmax are float32 whatever the cache dtype; an FP8
    cache's scales multiply the scores and the output."""
    num_seqs, num_heads, head_size = query.shape
    num_kv_heads = kv_cache.shape[1]
    keys = gather_context(kv_cache[0], block_ids, num_seqs).to(query.dtype)
    values = gather_context(kv_cache[1], block_ids, num_seqs).to(query.dtype)
    q = query.view(num_seqs, num_kv_heads, -1, head_size).transpose(0, 1)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float().mul_(scale * kv_scales[0]).add_(bias)
    out = torch.matmul(scores.softmax(-1).to(values.dtype), values)   # [kv_heads, seqs, group, head]
    return _scaled(out.transpose(0, 1).reshape(num_seqs, num_heads, head_size), kv_scales[1])


def _scaled(out: torch.Tensor, value_scale: float) -> torch.Tensor:
    return out if value_scale == 1.0 else out.mul_(value_scale)


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      token_index: torch.Tensor, num_seqs: int, max_query_len: int, block_ids: torch.Tensor | None,
                      mask: torch.Tensor | None, scale: float,
                      kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Prefill chunks, [tokens, heads, head], padded to [seqs, max_query_len] at ``token_index`` (seq * max_query_len
    + row of each token). Without ``block_ids`` every chunk is a whole prompt, attended causally from its own new
    keys as the cache holds them; otherwise chunks attend their gathered cached context under ``mask`` [seqs,
    max_query_len, keys]."""
    num_heads, head_size = query.shape[1:]
    cache_dtype, scale = kv_cache.dtype, scale * kv_scales[0]

    def pad(x: torch.Tensor) -> torch.Tensor:   # [tokens, h, head] -> [seqs, h, max_query_len, head]
        padded = x.new_zeros(num_seqs * max_query_len, x.shape[1], head_size).index_copy_(0, token_index, x)
        return padded.view(num_seqs, max_query_len, -1, head_size).transpose(1, 2)

    q = pad(query)
    if block_ids is None:
        k = pad(to_cache(key, cache_dtype, kv_scales[0]).to(query.dtype))
        v = pad(to_cache(value, cache_dtype, kv_scales[1]).to(query.dtype))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                               enable_gqa=k.shape[1] != num_heads)
    else:
        k = gather_context(kv_cache[0], block_ids, num_seqs).transpose(0, 1).to(query.dtype)
        v = gather_context(kv_cache[1], block_ids, num_seqs).transpose(0, 1).to(query.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale,
                                                               enable_gqa=k.shape[1] != num_heads)
    return _scaled(out.transpose(1, 2).reshape(-1, num_heads, head_size).index_select(0, token_index), kv_scales[1])
