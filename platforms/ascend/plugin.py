"""The Huawei Ascend platform: tensors on torch.npu, which torch_npu adds once imported; the portable torch paged
attention on NPU tensors; collectives over HCCL. No graph capture: steps run eagerly."""
from __future__ import annotations

import importlib

import torch

from kvserve.platforms.accelerator import AcceleratorPlatform, missing_device_nodes, missing_runtime
from kvserve.plugins.interfaces import AttentionBackend, PlatformInfo

DEVICE_NODES = ("/dev/davinci[0-9]*",)   # one per NPU, from the Ascend driver


class AscendPlatform(AcceleratorPlatform):
    name = device_type = "npu"
    dist_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"

    def unavailable_reason(self) -> str:
        return (missing_runtime("torch_npu", "torch-npu", "pip install 'kvserve[npu]', with the Ascend CANN toolkit")
                or missing_device_nodes("Ascend NPU", DEVICE_NODES))

    def device_module(self):
        importlib.import_module("torch_npu")   # it registers torch.npu and the hccl backend
        return torch.npu

    def device_facts(self) -> PlatformInfo:
        npu = self.device_module()
        return PlatformInfo(name=self.name, device_type=self.device_type, priority=self.priority,
                            dist_backend=self.dist_backend,
                            supported_dtypes=(torch.float16, torch.bfloat16, torch.float32),
                            default_dtype=torch.bfloat16,
                            details={"device": npu.get_device_name(0), "devices": str(npu.device_count())})

    def attention_backends(self) -> list[type[AttentionBackend]]:
        from kvserve.plugins.torch_attention import TorchPagedAttention

        return [TorchPagedAttention]


plugin = AscendPlatform()
