"""Portable paged attention in torch ops alone: it runs on any torch device, and it is the backend a platform
plugin starts from (examples/vendor_plugin) before it has kernels of its own. The CPU platform runs it where its
compiled kernels cannot.

The cache keeps each kv head's blocks together, [2, kv_heads, blocks, block_size, head], so that gathering a
batch's blocks yields [kv_heads, seqs, tokens, head]: the operand a batched matmul takes without a copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvserve.plugins.backend_choice import common_reasons
from kvserve.plugins.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec, StepLayout


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


def soft_capped(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Scaled scores as ``cap`` * tanh(score / ``cap``), in place; unchanged without a cap."""
    return scores if cap is None else scores.div_(cap).tanh_().mul_(cap)


def decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, bias: torch.Tensor,
                     scale: float, kv_scales: tuple[float, float] = (1.0, 1.0),
                     soft_cap: float | None = None) -> torch.Tensor:
    """One query per sequence, [seqs, heads, head], over its cached context; ``bias`` [seqs, 1, keys] is 0 for
    the keys it attends and -inf for the rest. Scores and softmax are float32 whatever the cache dtype; an FP8
    cache's scales multiply the scores and the output."""
    num_seqs, num_heads, head_size = query.shape
    num_kv_heads = kv_cache.shape[1]
    keys = gather_context(kv_cache[0], block_ids, num_seqs).to(query.dtype)
    values = gather_context(kv_cache[1], block_ids, num_seqs).to(query.dtype)
    q = query.view(num_seqs, num_kv_heads, -1, head_size).transpose(0, 1)
    scores = soft_capped(torch.matmul(q, keys.transpose(-1, -2)).float().mul_(scale * kv_scales[0]), soft_cap)
    out = torch.matmul(scores.add_(bias).softmax(-1).to(values.dtype), values)   # [kv_heads, seqs, group, head]
    return _scaled(out.transpose(0, 1).reshape(num_seqs, num_heads, head_size), kv_scales[1])


def _scaled(out: torch.Tensor, value_scale: float) -> torch.Tensor:
    return out if value_scale == 1.0 else out.mul_(value_scale)


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                      soft_cap: float | None) -> torch.Tensor:
    """[seqs, heads, queries, head] over [seqs, kv_heads, keys, head] where ``mask`` [seqs, queries, keys]
    allows; scaled_dot_product_attention has no soft cap, so capped scores are computed here."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if soft_cap is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale,
                                                                enable_gqa=num_kv_heads != num_heads)
    seqs, _, queries, head_size = q.shape
    grouped = q.reshape(seqs, num_kv_heads, -1, head_size)   # each kv head's query heads, one after another
    scores = soft_capped(torch.matmul(grouped, k.transpose(-1, -2)).float().mul_(scale), soft_cap)
    scores = scores.view(seqs, num_kv_heads, -1, queries, k.shape[2]).masked_fill_(~mask[:, None, None],
                                                                                  float("-inf"))
    probs = scores.softmax(-1).to(v.dtype).view(seqs, num_kv_heads, -1, k.shape[2])
    return torch.matmul(probs, v).view(seqs, num_heads, queries, head_size)


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      token_index: torch.Tensor, num_seqs: int, max_query_len: int, block_ids: torch.Tensor | None,
                      mask: torch.Tensor | None, scale: float,
                      kv_scales: tuple[float, float] = (1.0, 1.0), soft_cap: float | None = None) -> torch.Tensor:
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
        out = _masked_attention(q, k, v, mask, scale, soft_cap)
    return _scaled(out.transpose(1, 2).reshape(-1, num_heads, head_size).index_select(0, token_index), kv_scales[1])


class HeadMajorPagedAttention(AttentionBackend):
    """The cache layout of this module (each kv head's blocks together), in the model dtype or FP8, and the dtypes
    computed in; the CPU platform's compiled backend shares it."""

    kv_cache_dtypes = (torch.float8_e4m3fn, torch.float8_e5m2)

    @classmethod
    def unsupported_reasons(cls, spec: AttentionSpec) -> list[str]:
        return common_reasons(spec, (torch.float32, torch.bfloat16, torch.float16))

    kv_cache_shape = staticmethod(kv_cache_shape)

    def copy_blocks(self, source: torch.Tensor, destination: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Blocks are the fourth dimension of [layers, 2, kv_heads, blocks, ...]."""
        from_ids = torch.tensor([p[0] for p in pairs], device=source.device)
        to_ids = torch.tensor([p[1] for p in pairs], device=destination.device)
        destination[:, :, :, to_ids] = source[:, :, :, from_ids].to(destination.device)


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    """What every layer shares, built once per step: decodes' flat block ids; prefills' padding index, block ids
    and whether every chunk is a whole prompt; and the masks of each sliding window (None: none), built by the
    first layer that attends under it."""

    decode_block_ids: torch.Tensor | None = None
    prefill_token_index: torch.Tensor | None = None
    prefill_block_ids: torch.Tensor | None = None
    whole_prompts: bool = True
    masks: dict = field(default_factory=dict)


class TorchPagedAttention(HeadMajorPagedAttention):
    """Paged attention in torch: decodes as batched matmuls over gathered blocks, prefills as one padded
    scaled_dot_product_attention (causal over their own keys when every chunk is a whole prompt, no window applies
    and no cap)."""

    name = "torch-paged"
    store_kv = staticmethod(store_kv)
    soft_caps_logits = True

    def build_metadata(self, layout: StepLayout) -> TorchAttentionMetadata:
        m = TorchAttentionMetadata(**vars(super().build_metadata(layout)))
        d = layout.num_decodes
        if d:
            m.decode_block_ids = m.block_tables[:d, :self._blocks_for(max(layout.seq_lens[:d]))].reshape(-1)
        if d < len(layout.seq_lens):
            query_lens = m.query_start_loc[d:].diff()
            starts = m.query_start_loc[d:-1] - m.query_start_loc[d]
            num_tokens = len(m.positions) - d   # decodes have one token each
            seq_of_token = torch.repeat_interleave(torch.arange(len(starts), device=self.device), query_lens,
                                                   output_size=num_tokens)
            m.prefill_token_index = (seq_of_token * m.max_query_len + torch.arange(num_tokens, device=self.device)
                                     - starts[seq_of_token])
            m.prefill_block_ids = m.block_tables[d:, :self._blocks_for(m.max_seq_len)].reshape(-1)
            m.whole_prompts = layout.query_lens[d:] == layout.seq_lens[d:]
        return m

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.spec.block_size)

    def _decode_bias(self, m: TorchAttentionMetadata) -> torch.Tensor:
        """The decodes' additive mask [decodes, 1, keys] under this layer's window."""
        def build() -> torch.Tensor:
            d = m.num_decodes
            allowed = allowed_keys(m.seq_lens[:d], torch.ones_like(m.seq_lens[:d]), 1,
                                   len(m.decode_block_ids) // d * self.spec.block_size, self.spec.sliding_window)
            return torch.zeros(allowed.shape, device=self.device).masked_fill_(~allowed, float("-inf"))
        return self._once_a_step(m, "decode", build)

    def _prefill_mask(self, m: TorchAttentionMetadata) -> torch.Tensor:
        """The prefills' mask [prefills, max_query_len, keys] under this layer's window."""
        def build() -> torch.Tensor:
            d = m.num_decodes
            keys = len(m.prefill_block_ids) // (len(m.seq_lens) - d) * self.spec.block_size
            return allowed_keys(m.seq_lens[d:], m.query_start_loc[d:].diff(), m.max_query_len, keys,
                                self.spec.sliding_window)
        return self._once_a_step(m, "prefill", build)

    def _once_a_step(self, m: TorchAttentionMetadata, kind: str, build) -> torch.Tensor:
        """``build()``'s mask of ``kind`` under this layer's window, made by the first layer that asks for it."""
        key = kind, self.spec.sliding_window
        if key not in m.masks:
            m.masks[key] = build()
        return m.masks[key]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: TorchAttentionMetadata, scale: float,
                kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        m, d, cap = metadata, metadata.num_decodes, self.spec.logits_soft_cap
        self.store_kv(key, value, kv_cache, m.slot_mapping, kv_scales)
        outputs = []
        if d:
            outputs.append(decode_attention(query[:d], kv_cache, m.decode_block_ids, self._decode_bias(m), scale,
                                            kv_scales, cap))
        if m.prefill_token_index is not None:
            causal = m.whole_prompts and self.spec.sliding_window is None and cap is None
            outputs.append(prefill_attention(query[d:], key[d:], value[d:], kv_cache, m.prefill_token_index,
                                             len(m.seq_lens) - d, m.max_query_len,
                                             None if causal else m.prefill_block_ids,
                                             None if causal else self._prefill_mask(m), scale, kv_scales, cap))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
