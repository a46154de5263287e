"""The toy platform: CPU tensors, a naive per-sequence attention backend, and a counting rms_norm.

It uses only the public contract (kvserve.plugins) and torch, as an out-of-tree vendor plugin would.
``CALLS`` counts attention forwards, block copies and rms_norm calls so tests can prove generation ran
through it. It stands in for a device with memory of its own: it accepts preemption_mode="swap", whose
host copies of KV blocks then live in other CPU tensors.
"""
from __future__ import annotations

import os

import torch

from kvserve.plugins import hookimpl
from kvserve.plugins.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec, MemoryInfo, PlatformInfo

KVSERVE_CONTRACT_VERSION = 2

KV_CACHE_BYTES = 32 << 20
CALLS = {"attention": 0, "copy_blocks": 0, "rms_norm": 0}


class ToyAttention(AttentionBackend):
    """One sequence at a time: gather its context through the block table, then matmul, mask, softmax."""

    name = "toy-naive"

    @classmethod
    def unsupported_reasons(cls, spec: AttentionSpec) -> list[str]:
        reasons = []
        if spec.dtype != torch.float32:
            reasons.append(f"dtype {spec.dtype} is not float32")
        if spec.num_heads % spec.num_kv_heads:
            reasons.append(f"{spec.num_heads} query heads are not a multiple of {spec.num_kv_heads} kv heads")
        return reasons

    def copy_blocks(self, source: torch.Tensor, destination: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        CALLS["copy_blocks"] += 1
        for src, dst in pairs:
            destination[:, :, dst] = source[:, :, src]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        CALLS["attention"] += 1
        block_size, num_kv_heads, head_size = kv_cache.shape[2:]
        key_cache = kv_cache[0].view(-1, num_kv_heads, head_size)
        value_cache = kv_cache[1].view(-1, num_kv_heads, head_size)
        key_cache[metadata.slot_mapping] = key.to(kv_cache.dtype)
        value_cache[metadata.slot_mapping] = value.to(kv_cache.dtype)

        group = self.spec.num_heads // num_kv_heads
        window = self.spec.sliding_window
        starts = metadata.query_start_loc.tolist()
        out = torch.empty_like(query)
        for i, seq_len in enumerate(metadata.seq_lens.tolist()):
            start, end = starts[i], starts[i + 1]
            context = torch.arange(seq_len, device=query.device)
            slots = metadata.block_tables[i, context // block_size] * block_size + context % block_size
            k = key_cache[slots].repeat_interleave(group, dim=1).transpose(0, 1)    # [heads, ctx, head]
            v = value_cache[slots].repeat_interleave(group, dim=1).transpose(0, 1)
            q = query[start:end].transpose(0, 1)                                     # [heads, new, head]
            scores = torch.matmul(q, k.transpose(1, 2)) * scale                      # [heads, new, ctx]
            distance = context[seq_len - (end - start):, None] - context[None, :]
            allowed = distance >= 0
            if window is not None:
                allowed &= distance < window
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            out[start:end] = torch.matmul(probs, v).transpose(0, 1)
        return out


def counting_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    CALLS["rms_norm"] += 1
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


@hookimpl
def platform_detect() -> PlatformInfo:
    return PlatformInfo(name="toy", device_type="cpu", priority=-10, dist_backend="gloo",
                        supported_dtypes=(torch.float32,), default_dtype=torch.float32,
                        details={"attention": ToyAttention.name})


@hookimpl
def platform_bind_device(local_index: int) -> torch.device:
    return torch.device("cpu")   # one device for all: the engine logs which index each process would take


@hookimpl
def platform_update_config(config) -> None:
    if config.cache.kv_cache_memory is None:
        config.cache.kv_cache_memory = KV_CACHE_BYTES


@hookimpl
def platform_memory_info(device: torch.device) -> MemoryInfo:
    page = os.sysconf("SC_PAGE_SIZE")
    return MemoryInfo(total_bytes=page * os.sysconf("SC_PHYS_PAGES"), free_bytes=page * os.sysconf("SC_AVPHYS_PAGES"))


@hookimpl
def platform_attention_backend(spec: AttentionSpec) -> type[AttentionBackend]:
    reasons = ToyAttention.unsupported_reasons(spec)
    if reasons:
        raise ValueError(f"the toy platform cannot run this model: {ToyAttention.name}: " + "; ".join(reasons))
    return ToyAttention


@hookimpl
def platform_graph_runner(model, backend, config):
    return None


@hookimpl
def platform_communicator(rank: int, world_size: int, group):
    from kvserve.plugins.defaults import TorchDistributedCommunicator

    return TorchDistributedCommunicator(rank, world_size, "gloo", group)


@hookimpl
def platform_ops() -> dict:
    return {"rms_norm": counting_rms_norm}


@hookimpl
def platform_quant_kernel(weight):
    return None   # the portable reference of every scheme


@hookimpl
def platform_seed(seed: int) -> None:
    torch.manual_seed(seed)


@hookimpl
def platform_synchronize(device: torch.device) -> None:
    return None
