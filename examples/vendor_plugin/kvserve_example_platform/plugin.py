"""The "example" platform: every platform hook of kvserve's plugin contract, built on the portable references
so that it runs (on CPU tensors) and passes ``kvserve conformance example`` as it stands. A vendor copies it,
renames it, sets DEVICE_TYPE to the chip's torch device type, and replaces one reference at a time with the
chip's own kernels, running the conformance suite after each."""
from __future__ import annotations

import os

import torch

from kvserve.plugins import hookimpl
from kvserve.plugins.backend_choice import choose_backend
from kvserve.plugins.interfaces import AttentionBackend, AttentionSpec, MemoryInfo, PlatformInfo

KVSERVE_CONTRACT_VERSION = 2   # the plugin contract this plugin was written for; kvserve refuses others

NAME = "example"
DEVICE_TYPE = "cpu"   # the chip's torch device type: "xpu", "hpu", "npu", "privateuseone", ...
KV_CACHE_SHARE = 0.25   # of free memory, when the user sets no --kv-cache-memory


def unavailable_reason() -> str:
    """Why the chip cannot be used here, or "": cheap, without starting a device. A real plugin checks that its
    runtime is importable (importlib.util.find_spec) and that a device node or driver is present."""
    return ""


@hookimpl
def platform_detect() -> PlatformInfo:
    # A negative priority: chosen only by name (--device example), never over the CPU platform by default.
    return PlatformInfo(name=NAME, device_type=DEVICE_TYPE, priority=-20, dist_backend="gloo",
                        supported_dtypes=(torch.float32, torch.bfloat16), default_dtype=torch.float32,
                        unavailable_reason=unavailable_reason(), details={"attention": "torch-paged (portable)"})


@hookimpl
def platform_bind_device(local_index: int) -> torch.device:
    # A chip with several devices checks local_index against their count and makes that one current.
    return torch.device(DEVICE_TYPE)


def _memory() -> MemoryInfo:
    page = os.sysconf("SC_PAGE_SIZE")
    return MemoryInfo(total_bytes=page * os.sysconf("SC_PHYS_PAGES"), free_bytes=page * os.sysconf("SC_AVPHYS_PAGES"))


@hookimpl
def platform_update_config(config) -> None:
    if config.cache.preemption_mode == "swap":
        raise ValueError("preemption_mode='swap' copies KV blocks to host memory, where this platform keeps them "
                         "already; allowed on the example platform: 'recompute'")
    if config.cache.kv_cache_memory is None:
        config.cache.kv_cache_memory = int(_memory().free_bytes * KV_CACHE_SHARE)


@hookimpl
def platform_memory_info(device: torch.device) -> MemoryInfo:
    return _memory()


@hookimpl
def platform_attention_backend(spec: AttentionSpec) -> type[AttentionBackend]:
    # The portable backend: torch ops on whatever device its tensors are on. Put the chip's own backends first;
    # choose_backend takes the first that can run the spec and otherwise lists every candidate's reasons.
    from kvserve.plugins.torch_attention import TorchPagedAttention

    return choose_backend([TorchPagedAttention], spec)


@hookimpl
def platform_graph_runner(model, backend, config):
    return None   # eager: a chip with graph capture returns a GraphRunner unless config.device.enforce_eager


@hookimpl
def platform_communicator(rank: int, world_size: int, group):
    from kvserve.plugins.defaults import TorchDistributedCommunicator

    # torch.distributed over the backend the chip's collectives library registers (gloo for host tensors).
    return TorchDistributedCommunicator(rank, world_size, "gloo", group)


@hookimpl
def platform_ops() -> dict:
    return {}   # fused kernels by name ("rms_norm", "silu_and_mul", ...); those not returned keep torch's


@hookimpl
def platform_quant_kernel(weight):
    return None   # every quantization scheme on the portable reference: dequantize, then matmul


@hookimpl
def platform_seed(seed: int) -> None:
    torch.manual_seed(seed)


@hookimpl
def platform_synchronize(device: torch.device) -> None:
    return None   # a chip with asynchronous queues waits for them here
