"""The CPU platform's paged attention backends."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.kernels_cpu import native
from kvserve.kernels_cpu import paged_attention as kernels
from kvserve.plugins.backend_choice import common_reasons
from kvserve.plugins.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec, StepLayout


class CpuPagedAttention(AttentionBackend):
    """What the CPU backends share: the dtypes they compute in, and a cache that keeps each kv head's blocks
    together, [2, kv_heads, blocks, block_size, head], in the model dtype or FP8."""

    kv_cache_dtypes = (torch.float8_e4m3fn, torch.float8_e5m2)

    @classmethod
    def unsupported_reasons(cls, spec: AttentionSpec) -> list[str]:
        return common_reasons(spec, (torch.float32, torch.bfloat16, torch.float16))

    kv_cache_shape = staticmethod(kernels.kv_cache_shape)

    def copy_blocks(self, source: torch.Tensor, destination: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Blocks are the fourth dimension of [layers, 2, kv_heads, blocks, ...]."""
        from_ids = torch.tensor([p[0] for p in pairs], device=source.device)
        to_ids = torch.tensor([p[1] for p in pairs], device=destination.device)
        destination[:, :, :, to_ids] = source[:, :, :, from_ids].to(destination.device)


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    """What every layer shares, built once per step: decodes' flat block ids and additive mask; prefills'
    padding index and, when some chunk follows cached context or a window applies, their block ids and mask."""

    decode_block_ids: torch.Tensor | None = None
    decode_bias: torch.Tensor | None = None
    prefill_token_index: torch.Tensor | None = None
    prefill_block_ids: torch.Tensor | None = None
    prefill_mask: torch.Tensor | None = None


class TorchPagedAttention(CpuPagedAttention):
    """Paged attention in torch: decodes as batched matmuls over gathered blocks, prefills as one padded
    scaled_dot_product_attention (causal over their own keys when every chunk is a whole prompt)."""

    name = "torch-paged"
    store_kv = staticmethod(kernels.store_kv)

    def build_metadata(self, layout: StepLayout) -> TorchAttentionMetadata:
        m = TorchAttentionMetadata(**vars(super().build_metadata(layout)))
        d, window = layout.num_decodes, self.spec.sliding_window
        if d:
            blocks = self._blocks_for(max(layout.seq_lens[:d]))
            m.decode_block_ids = m.block_tables[:d, :blocks].reshape(-1)
            allowed = kernels.allowed_keys(m.seq_lens[:d], torch.ones_like(m.seq_lens[:d]), 1,
                                           blocks * self.spec.block_size, window)
            m.decode_bias = torch.zeros(allowed.shape, device=self.device).masked_fill_(~allowed, float("-inf"))
        if d < len(layout.seq_lens):
            query_lens, seq_lens = m.query_start_loc[d:].diff(), m.seq_lens[d:]
            starts = m.query_start_loc[d:-1] - m.query_start_loc[d]
            num_tokens = len(m.positions) - d   # decodes have one token each
            seq_of_token = torch.repeat_interleave(torch.arange(len(starts), device=self.device), query_lens,
                                                   output_size=num_tokens)
            m.prefill_token_index = (seq_of_token * m.max_query_len + torch.arange(num_tokens, device=self.device)
                                     - starts[seq_of_token])
            if window is not None or layout.query_lens[d:] != layout.seq_lens[d:]:
                blocks = self._blocks_for(m.max_seq_len)
                m.prefill_block_ids = m.block_tables[d:, :blocks].reshape(-1)
                m.prefill_mask = kernels.allowed_keys(seq_lens, query_lens, m.max_query_len,
                                                      blocks * self.spec.block_size, window)
        return m

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.spec.block_size)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: TorchAttentionMetadata, scale: float,
                kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        m, d = metadata, metadata.num_decodes
        self.store_kv(key, value, kv_cache, m.slot_mapping, kv_scales)
        outputs = []
        if d:
            outputs.append(kernels.decode_attention(query[:d], kv_cache, m.decode_block_ids, m.decode_bias, scale,
                                                    kv_scales))
        if m.prefill_token_index is not None:
            num_prefills = len(m.seq_lens) - d
            outputs.append(kernels.prefill_attention(query[d:], key[d:], value[d:], kv_cache, m.prefill_token_index,
                                                     num_prefills, m.max_query_len, m.prefill_block_ids,
                                                     m.prefill_mask, scale, kv_scales))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class NativePagedAttention(CpuPagedAttention):
    """The compiled kernel (kernels_cpu/csrc/paged_attention.cpp): decodes and prefill chunks in one call,
    reading keys and values in place from the cache, where keys are stored transposed within their block."""

    name = "cpu-native"
    store_kv = staticmethod(native.store_kv)
    replays_decode_steps = True   # forward's Python depends on a decode step only through shapes: CPU graphs

    @classmethod
    def unsupported_reasons(cls, spec: AttentionSpec) -> list[str]:
        unavailable = native.load()[1]
        return super().unsupported_reasons(spec) + ([f"native kernels: {unavailable}"] if unavailable else [])

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        self.store_kv(key, value, kv_cache, metadata.slot_mapping, kv_scales)
        return native.paged_attention(query, kv_cache, metadata.block_tables, metadata.seq_lens,
                                      metadata.query_start_loc, scale, self.spec.sliding_window, kv_scales)
