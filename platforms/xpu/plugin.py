"""The Intel GPU platform: tensors on torch.xpu (built into torch's XPU wheels), paged attention through
intel-extension-for-pytorch's kernels when a matching IPEX is installed and the portable torch backend otherwise,
collectives over XCCL. No graph capture: decode steps run eagerly."""
from __future__ import annotations

import torch

from kvserve.platforms.accelerator import AcceleratorPlatform
from kvserve.plugins.interfaces import AttentionBackend, PlatformInfo


class XpuPlatform(AcceleratorPlatform):
    name = device_type = "xpu"
    dist_backend = "xccl"
    visible_devices_env = "ZE_AFFINITY_MASK"

    def unavailable_reason(self) -> str:
        if getattr(torch.version, "xpu", None) is None:
            return ("this torch is built without XPU support (install torch's XPU wheel, from "
                    "https://download.pytorch.org/whl/xpu)")
        if not torch.xpu.is_available():
            return "no Intel GPU is visible (torch.xpu.is_available() is False)"
        return ""

    def device_facts(self) -> PlatformInfo:
        from kvserve.platforms.cpu.ipex_attention import ipex_unavailable_reason

        props = torch.xpu.get_device_properties(0)
        bfloat16 = torch.xpu.is_bf16_supported()
        return PlatformInfo(name=self.name, device_type=self.device_type, priority=self.priority,
                            dist_backend=self.dist_backend,
                            supported_dtypes=(torch.float16, torch.bfloat16, torch.float32) if bfloat16 else
                            (torch.float16, torch.float32),
                            default_dtype=torch.bfloat16 if bfloat16 else torch.float16,
                            details={"device": props.name, "devices": str(torch.xpu.device_count()),
                                     "memory": f"{props.total_memory / (1 << 30):.1f} GiB",
                                     "ipex": ipex_unavailable_reason() or "available"})

    def attention_backends(self) -> list[type[AttentionBackend]]:
        from kvserve.platforms.cpu.ipex_attention import IpexPagedAttention
        from kvserve.plugins.torch_attention import TorchPagedAttention

        return [IpexPagedAttention, TorchPagedAttention]


plugin = XpuPlatform()
