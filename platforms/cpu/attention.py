"""The CPU platform's paged attention backend."""
from __future__ import annotations

import torch

from kvserve.kernels_cpu.paged_attention import store_kv, varlen_paged_attention
from kvserve.plugins.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec


class TorchPagedAttention(AttentionBackend):
    """Paged attention in torch: decodes and prefills run as two padded batches."""

    name = "torch-paged"

    @classmethod
    def unsupported_reasons(cls, spec: AttentionSpec) -> list[str]:
        reasons = []
        if spec.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            reasons.append(f"dtype {spec.dtype} is not float32, bfloat16 or float16")
        if spec.num_heads % spec.num_kv_heads:
            reasons.append(f"{spec.num_heads} query heads are not a multiple of {spec.num_kv_heads} kv heads")
        return reasons

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(key, value, kv_cache, metadata.slot_mapping)
        m, d = metadata, metadata.num_decodes
        window = self.spec.sliding_window
        if d == 0 or d == len(m.seq_lens):
            return varlen_paged_attention(query, kv_cache, m.query_start_loc, m.seq_lens, m.block_tables,
                                          m.max_query_len, m.max_seq_len, scale, window)
        decode_out = varlen_paged_attention(query[:d], kv_cache, m.query_start_loc[:d + 1], m.seq_lens[:d],
                                            m.block_tables[:d], 1, m.max_seq_len, scale, window)
        prefill_starts = m.query_start_loc[d:] - d
        prefill_out = varlen_paged_attention(query[d:], kv_cache, prefill_starts, m.seq_lens[d:],
                                             m.block_tables[d:], m.max_query_len, m.max_seq_len, scale, window)
        return torch.cat([decode_out, prefill_out])
