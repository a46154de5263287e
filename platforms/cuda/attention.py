"""Paged attention backends of the GPU platforms (CUDA and ROCm)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.kernels_cuda import paged_attention as kernels
from kvserve.plugins.backend_choice import common_reasons
from kvserve.plugins.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec, StepLayout


@dataclass
class TritonAttentionMetadata(AttentionMetadata):
    num_partitions: int = 1   # key partitions per decode (split-KV), > 1 for long contexts


class TritonPagedAttention(AttentionBackend):
    """The Triton kernels of kernels_cuda: one kernel for decodes and prefill chunks over the paged cache, and
    split-KV decodes for long contexts."""

    name = "triton"
    store_kv = staticmethod(kernels.store_kv)
    # Keys per split-KV program: long enough to amortize the combine, short enough to give every SM work.
    partition_len = 512

    kv_cache_dtypes = (torch.float8_e4m3fn, torch.float8_e5m2)
    soft_caps_logits = True

    @classmethod
    def unsupported_reasons(cls, spec: AttentionSpec) -> list[str]:
        reasons = common_reasons(spec, (torch.float16, torch.bfloat16, torch.float32))
        if spec.kv_cache_dtype is not None and torch.cuda.is_available():   # not under Triton's interpreter
            if torch.version.hip is not None:
                reasons.append("an FP8 KV cache is not supported on ROCm yet")
            elif torch.cuda.get_device_capability() < (8, 9):
                reasons.append("an FP8 KV cache needs compute capability 8.9 or newer")
        return reasons

    def build_metadata(self, layout: StepLayout) -> TritonAttentionMetadata:
        m = TritonAttentionMetadata(**vars(super().build_metadata(layout)))
        if m.max_query_len == 1 and m.max_seq_len > 2 * self.partition_len:
            m.num_partitions = -(-m.max_seq_len // self.partition_len)
        return m

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                metadata: TritonAttentionMetadata, scale: float,
                kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        self.store_kv(key, value, kv_cache, metadata.slot_mapping, kv_scales)
        return kernels.paged_attention(query, kv_cache, metadata.block_tables, metadata.seq_lens,
                                       metadata.query_start_loc, metadata.max_query_len, scale,
                                       self.spec.sliding_window, metadata.num_partitions, self.partition_len,
                                       kv_scales, self.spec.logits_soft_cap)
