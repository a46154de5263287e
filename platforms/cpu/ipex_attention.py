"""Paged attention through intel-extension-for-pytorch's kernels, on CPU tensors or (the xpu platform) Intel GPUs',
when a matching IPEX is installed."""
from __future__ import annotations

import functools
from importlib import metadata

import torch

from kvserve.plugins.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec

IPEX_HEAD_SIZES = (64, 80, 96, 112, 128, 256)


@functools.cache
def ipex_unavailable_reason() -> str:
    """Empty when IPEX can be used with this torch; otherwise why not (checked before importing it,
    because a mismatched IPEX exits the process on import)."""
    try:
        version = metadata.version("intel-extension-for-pytorch")
    except metadata.PackageNotFoundError:
        return "intel-extension-for-pytorch is not installed"
    if version.split(".")[:2] != torch.__version__.split(".")[:2]:
        return f"intel-extension-for-pytorch {version} does not match torch {torch.__version__}"
    try:
        import intel_extension_for_pytorch.llm.modules  # noqa: F401
    except Exception as exc:  # a broken install must not take the platform down
        return f"intel-extension-for-pytorch failed to import: {exc}"
    return ""


class IpexPagedAttention(AttentionBackend):
    """Decode with IPEX's single-query paged kernel, prefill with its varlen flash kernel over the cache."""

    name = "ipex-paged"

    @classmethod
    def unsupported_reasons(cls, spec: AttentionSpec) -> list[str]:
        reasons = [r for r in [ipex_unavailable_reason()] if r]
        if spec.dtype not in (torch.float32, torch.bfloat16):
            reasons.append(f"dtype {spec.dtype} is not float32 or bfloat16")
        if spec.head_size not in IPEX_HEAD_SIZES:
            reasons.append(f"head size {spec.head_size} is not one of {IPEX_HEAD_SIZES}")
        if spec.sliding_window is not None:
            reasons.append("sliding-window attention is not supported")
        return reasons

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, num_kv_heads, block_size, head_size)

    def __init__(self, spec: AttentionSpec, device: torch.device):
        super().__init__(spec, device)
        from intel_extension_for_pytorch.llm.modules import PagedAttention

        self.kernels = PagedAttention
        group = spec.num_heads // spec.num_kv_heads
        self.head_mapping = torch.arange(spec.num_kv_heads, dtype=torch.int32, device=device).repeat_interleave(group)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        m, d = metadata, metadata.num_decodes
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        self.kernels.reshape_and_cache(key, value, key_cache, value_cache, m.slot_mapping.int())
        out = torch.empty_like(query)
        tables, seq_lens = m.block_tables.int(), m.seq_lens.int()
        if d:
            self.kernels.single_query_cached_kv_attention(
                out[:d], query[:d].contiguous(), key_cache, value_cache, self.head_mapping, scale,
                tables[:d], seq_lens[:d], self.spec.block_size, m.max_seq_len, None)
        if d < len(seq_lens):
            starts_q = (m.query_start_loc[d:] - m.query_start_loc[d]).int()
            starts_k = torch.nn.functional.pad(seq_lens[d:].cumsum(0), (1, 0)).int()
            self.kernels.flash_attn_varlen_func(
                out[d:], query[d:].contiguous(), key_cache, value_cache, starts_q, starts_k,
                m.max_query_len, m.max_seq_len, scale, True, tables[d:], None)
        return out
