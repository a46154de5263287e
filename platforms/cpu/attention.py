"""The CPU platform's compiled paged attention backend (the portable torch one is kvserve.plugins.torch_attention)."""
from __future__ import annotations

import torch

from kvserve.kernels_cpu import native
from kvserve.plugins.interfaces import AttentionMetadata, AttentionSpec
from kvserve.plugins.torch_attention import HeadMajorPagedAttention


class NativePagedAttention(HeadMajorPagedAttention):
    """The compiled kernel (kernels_cpu/csrc/paged_attention.cpp): decodes and prefill chunks in one call,
    reading keys and values in place from the cache, where keys are stored transposed within their block."""

    name = "cpu-native"
    store_kv = staticmethod(native.store_kv)
    soft_caps_logits = True
    replays_decode_steps = True   # forward's Python depends on a decode step only through shapes: CPU graphs

    def __init__(self, spec: AttentionSpec, device: torch.device):
        super().__init__(spec, device)
        native.announce("attention", f"kvserve's paged attention kernel ({native.isa('core')})")

    @classmethod
    def unsupported_reasons(cls, spec: AttentionSpec) -> list[str]:
        unavailable = native.load()[1]
        return super().unsupported_reasons(spec) + ([f"native kernels: {unavailable}"] if unavailable else [])

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        self.store_kv(key, value, kv_cache, metadata.slot_mapping, kv_scales)
        return native.paged_attention(query, kv_cache, metadata.block_tables, metadata.seq_lens,
                                      metadata.query_start_loc, scale, self.spec.sliding_window, kv_scales,
                                      self.spec.logits_soft_cap)
