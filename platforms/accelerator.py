"""What the platforms of devices with a torch device module of their own (torch.cuda, torch.xpu, torch.hpu,
torch.npu) share: one device per process, memory and seeds through that module, collectives over the vendor's
torch.distributed backend. Each subclass says how it recognises its hardware cheaply (no vendor runtime import,
no device start), what it reports once it is there, and which attention backends it brings."""
from __future__ import annotations

import glob
import importlib.util

import torch

from kvserve.plugins.backend_choice import choose_backend
from kvserve.plugins.hookspecs import hookimpl
from kvserve.plugins.interfaces import AttentionBackend, AttentionSpec, MemoryInfo, PlatformInfo

# Until the engine profiles a forward at start-up, the KV cache takes this share of the memory free when the
# engine is configured; the weights must fit in the rest.
KV_CACHE_SHARE = 0.5


def missing_runtime(module: str, package: str, how: str) -> str:
    """Why the vendor runtime ``module`` cannot be used, found without importing it; "" when it is installed."""
    return "" if importlib.util.find_spec(module) is not None else f"{package} is not installed ({how})"


def missing_device_nodes(what: str, patterns: tuple[str, ...]) -> str:
    """"" when the kernel driver shows a device node of one of ``patterns``, else why not: a look at /dev that
    starts no device."""
    if any(glob.glob(pattern) for pattern in patterns):
        return ""
    return f"no {what} is visible (no device node {' or '.join(patterns)})"


class AcceleratorPlatform:
    """A platform whose tensors live on ``torch.<device_type>`` devices."""

    KVSERVE_CONTRACT_VERSION = 2
    name: str
    device_type: str
    dist_backend: str
    visible_devices_env: str   # the variable that says which of the machine's devices this process sees
    priority = 10

    def unavailable_reason(self) -> str:
        """Why this platform cannot run here, or "" when it can: cheap, before the vendor runtime is imported."""
        raise NotImplementedError

    def device_facts(self) -> PlatformInfo:
        """This platform's facts once its hardware is known to be present (the runtime may be imported here)."""
        raise NotImplementedError

    def attention_backends(self) -> list[type[AttentionBackend]]:
        """The candidates, best first; the first that can run a model's attention is chosen."""
        raise NotImplementedError

    def device_module(self):
        return getattr(torch, self.device_type)

    def check_devices(self, needed: int) -> None:
        count = self.device_module().device_count()
        if needed > count:
            raise ValueError(f"the engine's processes need {needed} {self.name} devices on this machine, one each, "
                             f"but {count} are visible: tensor_parallel_size x pipeline_parallel_size x "
                             f"data_parallel_size may be at most {count} here ({self.visible_devices_env} says "
                             f"which are visible)")

    @hookimpl
    def platform_detect(self) -> PlatformInfo:
        reason = self.unavailable_reason()
        if reason:
            return PlatformInfo(name=self.name, device_type=self.device_type, priority=self.priority,
                                dist_backend=self.dist_backend, unavailable_reason=reason)
        return self.device_facts()

    @hookimpl
    def platform_bind_device(self, local_index: int) -> torch.device:
        self.check_devices(local_index + 1)
        self.device_module().set_device(local_index)   # where collectives and every tensor made on the type go
        return torch.device(self.device_type, local_index)

    @hookimpl
    def platform_update_config(self, config) -> None:
        parallel = config.parallel   # every rank of this replica, and of the replicas before it, takes a device
        self.check_devices((parallel.data_parallel_rank + 1) * parallel.tensor_parallel_size
                           * parallel.pipeline_parallel_size)
        cache = config.cache
        if cache.kv_cache_memory is None:
            cache.kv_cache_memory = int(self.device_module().mem_get_info()[0] * KV_CACHE_SHARE)

    @hookimpl
    def platform_memory_info(self, device: torch.device) -> MemoryInfo:
        free, total = self.device_module().mem_get_info(device)
        return MemoryInfo(total_bytes=total, free_bytes=free)

    @hookimpl
    def platform_attention_backend(self, spec: AttentionSpec) -> type[AttentionBackend]:
        return choose_backend(self.attention_backends(), spec)

    @hookimpl
    def platform_communicator(self, rank: int, world_size: int, group):
        from kvserve.plugins.defaults import TorchDistributedCommunicator

        return TorchDistributedCommunicator(rank, world_size, backend=self.dist_backend, group=group)

    @hookimpl
    def platform_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.device_module().manual_seed_all(seed)

    @hookimpl
    def platform_synchronize(self, device: torch.device) -> None:
        self.device_module().synchronize(device)
