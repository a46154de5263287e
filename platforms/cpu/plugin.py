"""The CPU platform plugin."""
from __future__ import annotations

import torch

from kvserve.kernels_cpu import native
from kvserve.plugins.backend_choice import choose_backend
from kvserve.plugins.hookspecs import hookimpl
from kvserve.plugins.interfaces import (GROUPED_BITS, AttentionBackend, AttentionSpec, MemoryInfo, PlatformInfo,
                                       QuantizedWeight)

KVSERVE_CONTRACT_VERSION = 2
DEFAULT_KV_CACHE_BYTES = 4 << 30

def _meminfo() -> MemoryInfo:
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) * 1024
    return MemoryInfo(total_bytes=fields["MemTotal"], free_bytes=fields["MemAvailable"])

def _has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls run at about twice float32's speed; elsewhere they are emulated."""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags

@hookimpl
def platform_detect() -> PlatformInfo:
    from kvserve.platforms.cpu.ipex_attention import ipex_unavailable_reason

    return PlatformInfo(name="cpu", device_type="cpu", priority=0, dist_backend="gloo",
                        supported_dtypes=(torch.float32, torch.bfloat16, torch.float16),
                        default_dtype=torch.bfloat16 if _has_native_bfloat16() else torch.float32,
                        details={"isa": torch.backends.cpu.get_cpu_capability(),
                                 "threads": str(torch.get_num_threads()),
                                 "ipex": ipex_unavailable_reason() or "available"})

@hookimpl
def platform_update_config(config) -> None:
    cache = config.cache
    if cache.preemption_mode == "swap":
        raise ValueError("preemption_mode='swap' moves KV blocks from device to host memory, and the cpu platform "
                         "keeps them in host memory already; allowed on cpu: 'recompute'")
    if cache.kv_cache_memory is None:
        cache.kv_cache_memory = min(DEFAULT_KV_CACHE_BYTES, _meminfo().free_bytes // 4)
    # What nearly every model runs: attention, and bfloat16 linear layers where bfloat16 is native. A first start
    # builds them while it reads the tokenizer and weights; other linear kernels build when a weight needs them.
    bfloat16 = config.model.torch_dtype in (None, torch.bfloat16) and _has_native_bfloat16()
    native.build_in_background("core", *(("bf16",) if bfloat16 else ()))

@hookimpl
def platform_memory_info(device: torch.device) -> MemoryInfo:
    return _meminfo()

@hookimpl
def platform_attention_backend(spec: AttentionSpec) -> type[AttentionBackend]:
    from kvserve.platforms.cpu.attention import NativePagedAttention
    from kvserve.plugins.torch_attention import TorchPagedAttention
    from kvserve.platforms.cpu.ipex_attention import IpexPagedAttention

    return choose_backend([IpexPagedAttention, NativePagedAttention, TorchPagedAttention], spec)

@hookimpl
def platform_graph_runner(model, backend, config):
    from kvserve.platforms.cpu.graphs import CpuGraphRunner

    # A recording cannot replay collectives between ranks: split models run eager.
    if (config.device.enforce_eager or not getattr(backend, "replays_decode_steps", False)
            or config.parallel.tensor_parallel_size > 1 or config.parallel.pipeline_parallel_size > 1):
        return None
    return CpuGraphRunner(model)

@hookimpl
def platform_communicator(rank: int, world_size: int, group):
    from kvserve.plugins.defaults import TorchDistributedCommunicator

    return TorchDistributedCommunicator(rank, world_size, backend="gloo", group=group)

@hookimpl
def platform_ops() -> dict:
    return native.FUSED_OPS if native.load()[0] is not None else {}

@hookimpl
def platform_linear_kernel(weight: torch.Tensor):
    from kvserve.kernels_cpu.linear import packed_linear

    return packed_linear(weight)

@hookimpl
def platform_gate_up_kernel(weight: torch.Tensor):
    from kvserve.kernels_cpu.linear import gate_up_linear

    return gate_up_linear(weight)

@hookimpl
def platform_quant_kernel(weight: QuantizedWeight):
    from kvserve.kernels_cpu.linear import fp8_linear, grouped_linear, int8_linear

    if weight.scheme == "w8a8_int8":
        return int8_linear(weight.tensors["qweight"], weight.tensors["scale"])
    if weight.scheme in ("w8a8_fp8", "w8a16_fp8"):
        return fp8_linear(weight)
    if weight.scheme in GROUPED_BITS:
        return grouped_linear(weight)
    return None

@hookimpl
def platform_seed(seed: int) -> None:
    torch.manual_seed(seed)

@hookimpl
def platform_synchronize(device: torch.device) -> None:
    return None
