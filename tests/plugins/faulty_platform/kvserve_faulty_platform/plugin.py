"""The example platform with two faults: attention scores scaled 10% too much, and an rms_norm 2% too large.
The conformance suite must fail the checks of those two (and the end-to-end parity they spoil), passing the rest."""
from __future__ import annotations

import torch

from kvserve.plugins import hookimpl
from kvserve.plugins.interfaces import AttentionSpec, PlatformInfo
from kvserve.plugins.torch_attention import TorchPagedAttention
from kvserve_example_platform.plugin import (KVSERVE_CONTRACT_VERSION, platform_bind_device, platform_communicator,
                                             platform_graph_runner, platform_memory_info, platform_quant_kernel,
                                             platform_seed, platform_synchronize, platform_update_config)

__all__ = ["KVSERVE_CONTRACT_VERSION", "platform_bind_device", "platform_communicator", "platform_graph_runner",
           "platform_memory_info", "platform_quant_kernel", "platform_seed", "platform_synchronize",
           "platform_update_config"]


class OverscaledAttention(TorchPagedAttention):
    name = "overscaled"

    def forward(self, query, key, value, kv_cache, metadata, scale, kv_scales=(1.0, 1.0)):
        return super().forward(query, key, value, kv_cache, metadata, scale * 1.1, kv_scales)


@hookimpl
def platform_detect() -> PlatformInfo:
    return PlatformInfo(name="faulty", device_type="cpu", priority=-30, supported_dtypes=(torch.float32,))


@hookimpl
def platform_attention_backend(spec: AttentionSpec):
    return OverscaledAttention


def oversized_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (normed * 1.02).to(x.dtype) * weight


@hookimpl
def platform_ops() -> dict:
    return {"rms_norm": oversized_rms_norm}
