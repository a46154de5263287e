"""The GPU platform plugins: NVIDIA (CUDA) and AMD (ROCm, torch's HIP build) share one implementation and
differ in how they recognise their device and what they report about it."""
from __future__ import annotations

import importlib.util

import torch

from kvserve.plugins.backend_choice import choose_backend
from kvserve.plugins.hookspecs import hookimpl
from kvserve.plugins.interfaces import (GROUPED_BITS, AttentionBackend, AttentionSpec, MemoryInfo, PlatformInfo,
                                       QuantizedWeight)

OPTIONAL_KERNELS = ("triton", "flash_attn", "flashinfer")
# Until the engine profiles a forward at start-up, the KV cache takes this share of the memory free when the
# engine is configured; the weights must fit in the rest.
KV_CACHE_SHARE = 0.5


def check_devices(needed: int) -> None:
    count = torch.cuda.device_count()
    if needed > count:
        raise ValueError(f"the engine's processes need {needed} GPUs on this machine, one each, but {count} are "
                         f"visible: tensor_parallel_size x pipeline_parallel_size x data_parallel_size may be at "
                         f"most {count} here (CUDA_VISIBLE_DEVICES or HIP_VISIBLE_DEVICES says which are visible)")


class GpuPlatform:
    """One GPU vendor's platform; ``vendor`` is "cuda" (NVIDIA) or "rocm" (AMD)."""

    KVSERVE_CONTRACT_VERSION = 2

    def __init__(self, vendor: str):
        self.vendor = vendor

    def unavailable_reason(self) -> str:
        hip = torch.version.hip is not None
        if torch.version.cuda is None and not hip:
            return "this torch is built without CUDA or ROCm (a CPU-only wheel)"
        if hip != (self.vendor == "rocm"):
            return f"this torch is built for {'ROCm' if hip else 'CUDA'}; use the {'rocm' if hip else 'cuda'} platform"
        if not torch.cuda.is_available():
            return "no GPU is visible (torch.cuda.is_available() is False)"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'kvserve[" + self.vendor + "]')"
        return ""

    @hookimpl
    def platform_detect(self) -> PlatformInfo:
        reason = self.unavailable_reason()
        if reason:
            return PlatformInfo(name=self.vendor, device_type="cuda", priority=10, dist_backend="nccl",
                                unavailable_reason=reason)
        props = torch.cuda.get_device_properties(0)
        arch = props.gcnArchName if self.vendor == "rocm" else f"sm_{props.major}{props.minor}"
        bfloat16 = torch.cuda.is_bf16_supported()
        dtypes = (torch.float16, torch.bfloat16, torch.float32) if bfloat16 else (torch.float16, torch.float32)
        found = [name for name in OPTIONAL_KERNELS if importlib.util.find_spec(name) is not None]
        return PlatformInfo(name=self.vendor, device_type="cuda", priority=10, dist_backend="nccl",
                            supported_dtypes=dtypes, default_dtype=torch.bfloat16 if bfloat16 else torch.float16,
                            details={"device": props.name, "arch": arch, "devices": str(torch.cuda.device_count()),
                                     "memory": f"{props.total_memory / (1 << 30):.1f} GiB",
                                     "kernels": ", ".join(found) or "none"})

    @hookimpl
    def platform_bind_device(self, local_index: int) -> torch.device:
        check_devices(local_index + 1)
        torch.cuda.set_device(local_index)   # where NCCL and every tensor made on "cuda" go
        return torch.device("cuda", local_index)

    @hookimpl
    def platform_update_config(self, config) -> None:
        parallel = config.parallel   # every rank of this replica, and of the replicas before it, takes a GPU
        check_devices((parallel.data_parallel_rank + 1) * parallel.tensor_parallel_size
                      * parallel.pipeline_parallel_size)
        cache = config.cache
        if cache.kv_cache_memory is None:
            cache.kv_cache_memory = int(torch.cuda.mem_get_info()[0] * KV_CACHE_SHARE)

    @hookimpl
    def platform_memory_info(self, device: torch.device) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(device)
        return MemoryInfo(total_bytes=total, free_bytes=free)

    @hookimpl
    def platform_attention_backend(self, spec: AttentionSpec) -> type[AttentionBackend]:
        from kvserve.platforms.cuda.attention import TritonPagedAttention

        return choose_backend([TritonPagedAttention], spec)

    @hookimpl
    def platform_ops(self) -> dict:
        from kvserve.kernels_cuda.fused_ops import FUSED_OPS

        return FUSED_OPS

    def fp8_dtype(self, model_dtype: torch.dtype) -> torch.dtype | None:
        """The FP8 type this GPU's ``torch._scaled_mm`` multiplies into ``model_dtype`` outputs, or None."""
        if self.vendor == "cuda":
            return torch.float8_e4m3fn if torch.cuda.get_device_capability() >= (8, 9) else None
        arch = torch.cuda.get_device_properties(0).gcnArchName
        if model_dtype != torch.bfloat16:   # hipBLASLt's row-wise scaled GEMM writes bfloat16 only
            return None
        return torch.float8_e4m3fnuz if arch.startswith("gfx94") else (
            torch.float8_e4m3fn if arch.startswith(("gfx95", "gfx12")) else None)

    @hookimpl
    def platform_quant_kernel(self, weight: QuantizedWeight):
        from kvserve.kernels_cuda.fp8_gemm import fp8_gemm
        from kvserve.kernels_cuda.quant_gemm import grouped_gemm
        from kvserve.kernels_cuda.scaled_gemm import scaled_gemm

        if weight.scheme in GROUPED_BITS:
            return grouped_gemm(weight)
        fp8_dtype = self.fp8_dtype(weight.dtype) if weight.scheme == "w8a8_fp8" else None
        on_fp8_cores = fp8_gemm(weight, fp8_dtype) if fp8_dtype is not None else None
        return on_fp8_cores or scaled_gemm(weight)

    @hookimpl
    def platform_communicator(self, rank: int, world_size: int, group):
        from kvserve.plugins.defaults import TorchDistributedCommunicator

        return TorchDistributedCommunicator(rank, world_size, backend="nccl", group=group)   # RCCL on ROCm, under the same name

    @hookimpl
    def platform_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    @hookimpl
    def platform_synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)


plugin = GpuPlatform("cuda")
