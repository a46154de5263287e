"""The Intel Gaudi platform: tensors on torch.hpu, which Intel Gaudi's PyTorch bridge (habana_frameworks.torch,
from the Gaudi software stack) adds once imported; the portable torch paged attention, whose scaled dot products
the bridge runs on its fused SDPA kernel; collectives over HCCL. No graph capture: steps run eagerly."""
from __future__ import annotations

import importlib

import torch

from kvserve.platforms.accelerator import AcceleratorPlatform, missing_device_nodes, missing_runtime
from kvserve.plugins.interfaces import AttentionBackend, PlatformInfo

DEVICE_NODES = ("/dev/accel/accel*", "/dev/hl[0-9]*")   # the habanalabs driver's, by driver generation


class GaudiPlatform(AcceleratorPlatform):
    name = device_type = "hpu"
    dist_backend = "hccl"
    visible_devices_env = "HABANA_VISIBLE_MODULES"

    def unavailable_reason(self) -> str:
        return (missing_runtime("habana_frameworks", "Intel Gaudi's PyTorch bridge (habana_frameworks)",
                                "it comes with the Gaudi software stack or its docker images, not from PyPI")
                or missing_device_nodes("Gaudi device", DEVICE_NODES))

    def device_module(self):
        for module in ("habana_frameworks.torch.core", "habana_frameworks.torch.distributed.hccl"):
            importlib.import_module(module)   # they register torch.hpu and the hccl backend
        return torch.hpu

    def device_facts(self) -> PlatformInfo:
        hpu = self.device_module()
        return PlatformInfo(name=self.name, device_type=self.device_type, priority=self.priority,
                            dist_backend=self.dist_backend,
                            supported_dtypes=(torch.bfloat16, torch.float32), default_dtype=torch.bfloat16,
                            details={"device": hpu.get_device_name(0), "devices": str(hpu.device_count())})

    def attention_backends(self) -> list[type[AttentionBackend]]:
        from kvserve.plugins.torch_attention import TorchPagedAttention

        return [TorchPagedAttention]


plugin = GaudiPlatform()
