"""Paged attention in Triton, for decodes and prefill chunks alike (chunks after cached context, prefix-cache
hits and sliding windows included), and the store of new keys and values.

Cache layout, per layer: [2, blocks, block_size, kv_heads, head] (keys, values), the layout FlashAttention and
FlashInfer read. A program attends one kv head for a tile of one sequence's queries: its rows are
(query, head of the kv head's group) pairs, so a decode's whole group shares each key load. Long contexts
split their keys into partitions whose partial softmax states a second kernel combines (split-KV).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MIN_DOT = 16   # tl.dot's smallest M, N and K on GPUs
# Triton's interpreter (CPU tensors, TRITON_INTERPRET=1) returns garbage from tl.dot on 16-bit operands (triton
# 3.9): there the operands, already rounded to their dtype, are multiplied in float32.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DOTS_IN_FLOAT32 = INTERPRETED
# (mantissa bits, smallest normal exponent) of the FP8 cache types, for the interpreter's casts (see _on_fp8_grid)
FP8_GRIDS = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


@triton.jit
def _dot(a, b, IN_FLOAT32: tl.constexpr):
    """a @ b with float32 sums; float32 operands give float32 products (not TF32), as on other platforms."""
    if IN_FLOAT32:
        a, b = a.to(tl.float32), b.to(tl.float32)
    if a.dtype == tl.float32:
        product = tl.dot(a, b, input_precision="ieee")
    else:
        product = tl.dot(a, b)
    return product


@triton.jit
def _on_fp8_grid(x, MANTISSA: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """float32 ``x`` rounded to the nearest (ties to even) value of an FP8 type: Triton's interpreter casts values
    just below a power of two to half of it (triton 3.9), and values already on the grid exactly."""
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = ((tl.maximum(exponent, MIN_EXPONENT) - MANTISSA + 127) << 23).to(tl.float32, bitcast=True)
    return ((x / step + 12582912.0) - 12582912.0) * step   # adding 1.5 * 2^23 rounds to an integer


@triton.jit
def _store_kv_kernel(key, value, cache, slots, stride_kt, stride_kh, stride_vt, stride_vh, values_offset,
                     key_scale, value_scale, NUM_KV_HEADS: tl.constexpr, HEAD: tl.constexpr, HEAD_P: tl.constexpr,
                     FP8_MAX: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXPONENT: tl.constexpr,
                     INTERPRETED: tl.constexpr):
    token, kv_head = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots + token)
    if slot >= 0:   # a negative slot pads a captured batch
        d = tl.arange(0, HEAD_P)
        ok = d < HEAD
        to = slot * NUM_KV_HEADS * HEAD + kv_head * HEAD + d
        k = tl.load(key + token * stride_kt + kv_head * stride_kh + d, mask=ok)
        v = tl.load(value + token * stride_vt + kv_head * stride_vh + d, mask=ok)
        if FP8_MAX > 0:   # an FP8 cache: fp8(x / scale), saturated
            k = tl.clamp(k.to(tl.float32) / key_scale, -FP8_MAX, FP8_MAX)
            v = tl.clamp(v.to(tl.float32) / value_scale, -FP8_MAX, FP8_MAX)
            if INTERPRETED:
                k, v = _on_fp8_grid(k, MANTISSA, MIN_EXPONENT), _on_fp8_grid(v, MANTISSA, MIN_EXPONENT)
        tl.store(cache + to, k.to(cache.dtype.element_ty), mask=ok)
        tl.store(cache + values_offset + to, v.to(cache.dtype.element_ty), mask=ok)


@triton.jit
def _attention_kernel(out, partials_acc, partials_max, partials_sum, query, cache, block_tables, seq_lens,
                      query_start, scale, value_scale, window, values_offset, stride_qt, stride_qh, stride_ot,
                      stride_oh, stride_table, partition_len,
                      NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                      HEAD: tl.constexpr, HEAD_P: tl.constexpr, NUM_PARTITIONS: tl.constexpr,
                      DOTS_IN_FLOAT32: tl.constexpr, SOFT_CAP: tl.constexpr):
    seq, tile = tl.program_id(0), tl.program_id(1)
    kv_head, partition = tl.program_id(2) % NUM_KV_HEADS, tl.program_id(2) // NUM_KV_HEADS
    first_token = tl.load(query_start + seq)
    num_queries = tl.load(query_start + seq + 1) - first_token
    if tile * BLOCK_Q < num_queries:
        context = tl.load(seq_lens + seq) - num_queries   # position of the sequence's first new query
        rows = tl.arange(0, BLOCK_Q * GROUP_P)
        q_index = tile * BLOCK_Q + rows // GROUP_P
        head = kv_head * GROUP + rows % GROUP_P
        row_ok = (q_index < num_queries) & (rows % GROUP_P < GROUP)
        q_pos = context + q_index
        d = tl.arange(0, HEAD_P)
        d_ok = d < HEAD
        q = tl.load(query + (first_token + q_index)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        # Keys this tile needs: up to its last query's position, from its first query's window on; this
        # program takes its partition of them.
        end = context + tl.minimum((tile + 1) * BLOCK_Q, num_queries)
        begin = tl.where(window > 0, tl.maximum(context + tile * BLOCK_Q - window + 1, 0), 0)
        begin = tl.maximum(begin // BLOCK_N * BLOCK_N, partition * partition_len)
        end = tl.minimum(end, (partition + 1) * partition_len)

        top = tl.full([BLOCK_Q * GROUP_P], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_Q * GROUP_P], tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_P, HEAD_P], tl.float32)
        for start in range(begin, end, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            k_ok = k_pos < end
            block = tl.load(block_tables + seq * stride_table + k_pos // BLOCK_SIZE, mask=k_ok, other=0)
            at = (block * BLOCK_SIZE + k_pos % BLOCK_SIZE) * NUM_KV_HEADS * HEAD + kv_head * HEAD
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(cache + at[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            v = tl.load(cache + values_offset + at[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            scores = _dot(q, tl.trans(k), DOTS_IN_FLOAT32) * scale
            if SOFT_CAP > 0:   # cap * tanh(score / cap), tanh from exp: the interpreter has no tanh
                shrink = tl.exp(-2.0 * tl.abs(scores) / SOFT_CAP)
                scores = tl.where(scores < 0, -SOFT_CAP, SOFT_CAP) * (1.0 - shrink) / (1.0 + shrink)
            in_window = (q_pos[:, None] - k_pos[None, :] < window) | (window <= 0)
            allowed = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :] & in_window
            scores = tl.where(allowed, scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)   # rows with nothing allowed yet
            p = tl.exp(scores - shift[:, None])
            rescale = tl.exp(top - shift)
            total = total * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None] + _dot(p.to(v.dtype), v, DOTS_IN_FLOAT32)
            top = new_top

        token = first_token + q_index
        acc = acc * value_scale
        if NUM_PARTITIONS == 1:
            result = acc / tl.where(total == 0.0, 1.0, total)[:, None]
            tl.store(out + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     result.to(out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:
            state = (token * NUM_KV_HEADS * GROUP + head) * NUM_PARTITIONS + partition
            tl.store(partials_max + state, top, mask=row_ok)
            tl.store(partials_sum + state, total, mask=row_ok)
            tl.store(partials_acc + state[:, None] * HEAD_P + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _combine_partitions_kernel(out, partials_acc, partials_max, partials_sum, stride_ot, stride_oh,
                               NUM_HEADS: tl.constexpr, NUM_PARTITIONS: tl.constexpr,
                               PARTITIONS_P: tl.constexpr, HEAD: tl.constexpr, HEAD_P: tl.constexpr):
    token, head = tl.program_id(0), tl.program_id(1)
    parts = tl.arange(0, PARTITIONS_P)
    state = (token * NUM_HEADS + head) * NUM_PARTITIONS + parts
    part_ok = parts < NUM_PARTITIONS
    tops = tl.load(partials_max + state, mask=part_ok, other=float("-inf"))
    top = tl.max(tops, 0)
    weights = tl.where(tops == float("-inf"), 0.0, tl.exp(tops - top))
    total = tl.sum(tl.load(partials_sum + state, mask=part_ok, other=0.0) * weights, 0)
    d = tl.arange(0, HEAD_P)
    accs = tl.load(partials_acc + state[:, None] * HEAD_P + d[None, :], mask=part_ok[:, None], other=0.0)
    result = tl.sum(accs * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out + token * stride_ot + head * stride_oh + d, result.to(out.dtype.element_ty), mask=d < HEAD)


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """Write [tokens, kv_heads, head] keys and values into their cache slots (block * block_size + offset); an FP8
    cache holds fp8(x / scale)."""
    num_tokens, num_kv_heads, head = key.shape
    if num_tokens == 0:
        return
    fp8_max = torch.finfo(kv_cache.dtype).max if kv_cache.dtype in FP8_GRIDS else 0.0
    mantissa, min_exponent = FP8_GRIDS.get(kv_cache.dtype, (0, 0))
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, kv_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), *kv_scales, NUM_KV_HEADS=num_kv_heads, HEAD=head, HEAD_P=_padded(head),
        FP8_MAX=fp8_max, MANTISSA=mantissa, MIN_EXPONENT=min_exponent, INTERPRETED=INTERPRETED)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                    sliding_window: int | None, num_partitions: int = 1, partition_len: int = 0,
                    kv_scales: tuple[float, float] = (1.0, 1.0), soft_cap: float | None = None) -> torch.Tensor:
    """Every sequence's new queries, [tokens, heads, head], over its cache: causal, within the window, scores
    soft-capped where ``soft_cap`` says; an FP8 cache's keys and values times their ``kv_scales``. With
    ``num_partitions`` > 1, each program takes ``partition_len`` keys (a multiple of the 16-key chunk) of the
    context, and a second kernel combines them (for decodes of long contexts, which otherwise leave a GPU idle)."""
    num_tokens, num_heads, head = query.shape
    num_seqs, num_kv_heads, block_size = seq_lens.shape[0], kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    group_p = _padded(group, 1)
    block_q = max(1, MIN_DOT // group_p) if max_query_len == 1 else max(1, 64 // group_p)
    out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    split = num_partitions > 1
    states = (num_tokens, num_heads, num_partitions)
    partials_acc = query.new_empty((*states, _padded(head)), dtype=torch.float32) if split else out
    partials_max = query.new_empty(states, dtype=torch.float32) if split else out
    partials_sum = query.new_empty(states, dtype=torch.float32) if split else out
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads * num_partitions)
    _attention_kernel[grid](
        out, partials_acc, partials_max, partials_sum, query, kv_cache, block_tables, seq_lens, query_start_loc,
        scale * kv_scales[0], kv_scales[1], sliding_window or 0, kv_cache.stride(0), query.stride(0),
        query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), partition_len if split else 1 << 62,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_SIZE=block_size,
        BLOCK_N=MIN_DOT, HEAD=head, HEAD_P=_padded(head), NUM_PARTITIONS=num_partitions,
        DOTS_IN_FLOAT32=DOTS_IN_FLOAT32, SOFT_CAP=float(soft_cap or 0.0))
    if split:
        _combine_partitions_kernel[(num_tokens, num_heads)](
            out, partials_acc, partials_max, partials_sum, out.stride(0), out.stride(1), NUM_HEADS=num_heads,
            NUM_PARTITIONS=num_partitions, PARTITIONS_P=_padded(num_partitions, 1), HEAD=head,
            HEAD_P=_padded(head))
    return out


def _padded(n: int, least: int = MIN_DOT) -> int:
    return max(least, triton.next_power_of_2(n))
