"""The GPU platform plugins: NVIDIA (CUDA) and AMD (ROCm, torch's HIP build) share one implementation and
differ in how they recognise their device and what they report about it."""
from __future__ import annotations

import importlib.util

import torch

from kvserve.platforms.accelerator import AcceleratorPlatform
from kvserve.plugins.hookspecs import hookimpl
from kvserve.plugins.interfaces import GROUPED_BITS, AttentionBackend, PlatformInfo, QuantizedWeight

OPTIONAL_KERNELS = ("triton", "flash_attn", "flashinfer")


class GpuPlatform(AcceleratorPlatform):
    """One GPU vendor's platform; ``vendor`` is "cuda" (NVIDIA) or "rocm" (AMD)."""

    device_type = "cuda"
    dist_backend = "nccl"   # RCCL on ROCm, under the same name

    def __init__(self, vendor: str):
        self.vendor = self.name = vendor
        self.visible_devices_env = "HIP_VISIBLE_DEVICES" if vendor == "rocm" else "CUDA_VISIBLE_DEVICES"

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

    def device_facts(self) -> PlatformInfo:
        props = torch.cuda.get_device_properties(0)
        arch = props.gcnArchName if self.vendor == "rocm" else f"sm_{props.major}{props.minor}"
        bfloat16 = torch.cuda.is_bf16_supported()
        dtypes = (torch.float16, torch.bfloat16, torch.float32) if bfloat16 else (torch.float16, torch.float32)
        found = [name for name in OPTIONAL_KERNELS if importlib.util.find_spec(name) is not None]
        return PlatformInfo(name=self.vendor, device_type=self.device_type, priority=self.priority,
                            dist_backend=self.dist_backend,
                            supported_dtypes=dtypes, default_dtype=torch.bfloat16 if bfloat16 else torch.float16,
                            details={"device": props.name, "arch": arch, "devices": str(torch.cuda.device_count()),
                                     "memory": f"{props.total_memory / (1 << 30):.1f} GiB",
                                     "kernels": ", ".join(found) or "none"})

    def attention_backends(self) -> list[type[AttentionBackend]]:
        from kvserve.platforms.cuda.attention import TritonPagedAttention

        return [TritonPagedAttention]

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


plugin = GpuPlatform("cuda")
