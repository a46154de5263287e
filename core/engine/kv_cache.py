"""The paged KV cache's size and memory: blocks in the budget, the device cache and the host cache for swapping,
in the model dtype or the FP8 type of ``kv_cache_dtype``."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from kvserve.core.config import EngineConfig
from kvserve.core.distributed.parallel_state import fewest_over_ranks
from kvserve.core.engine.host_memory import host_zeros
from kvserve.core.layers.attention import Attention
from kvserve.core.log import logger
from kvserve.plugins.backend_choice import cache_reasons
from kvserve.plugins.interfaces import AttentionBackend, AttentionSpec
from kvserve.plugins.manager import Platform

# Scales from the first batch leave later keys and values this many times its largest before they saturate.
FIRST_BATCH_HEADROOM = 4.0


def check_cache_dtype(backend: type[AttentionBackend], spec: AttentionSpec, platform: Platform) -> None:
    """A clear error where the platform's chosen backend cannot keep an FP8 cache (a vendor's, say)."""
    if cache_reasons(backend, spec):
        kept = ", ".join(str(d).removeprefix("torch.") for d in backend.kv_cache_dtypes) or "none"
        raise ValueError(f"platform {platform.name!r}'s attention backend {backend.name!r} cannot keep the KV cache "
                         f"in {str(spec.kv_cache_dtype).removeprefix('torch.')} (FP8 types it keeps: {kept}); "
                         f"use kv_cache_dtype='auto'")


@dataclass
class KvCache:
    num_blocks: int
    block_bytes: int   # one block of every layer
    device_cache: torch.Tensor   # [layers, *backend.kv_cache_shape(num_blocks, ...)]
    host_cache: torch.Tensor | None   # the same for num_host_blocks, where swapped-out blocks wait
    num_host_blocks: int
    populating: threading.Thread | None = None   # the thread still faulting a CPU cache's pages in, if any

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.block_bytes


def cache_shape(spec: AttentionSpec, backend: AttentionBackend, num_layers: int, num_blocks: int) -> tuple[int, ...]:
    return (num_layers, *backend.kv_cache_shape(num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size))


def cache_block_bytes(spec: AttentionSpec, backend: AttentionBackend, num_layers: int) -> int:
    """Bytes one block takes in every layer's cache."""
    return torch.Size(cache_shape(spec, backend, num_layers, 1)).numel() * spec.cache_dtype.itemsize


def window_blocks_freed(spec: AttentionSpec, config: EngineConfig) -> int | None:
    """The sliding window out of which sequences give their blocks up: the model's, unless a draft model or EAGLE
    keeps keys and values in the same blocks for its own layers, which attend to all of them."""
    speculation = config.speculation
    if speculation is not None and speculation.method in ("draft_model", "eagle"):
        return None
    return spec.sliding_window


def tokens_held(spec: AttentionSpec, config: EngineConfig) -> int:
    """The most tokens one sequence keeps in the cache: max_model_len, or with a sliding window whose blocks are
    given up, its window and a step's tokens, over block boundaries."""
    window, max_len = window_blocks_freed(spec, config), config.model.max_model_len
    if window is None:
        return max_len
    return min(max_len, window + config.scheduler.max_num_batched_tokens + 2 * spec.block_size)


def allocate_kv_cache(config: EngineConfig, spec: AttentionSpec, backend: AttentionBackend, num_layers: int,
                      platform: Platform, draft_block_bytes: int = 0) -> KvCache:
    """The cache and its host copy for swapping; ``draft_block_bytes``: what a block takes in a draft model's
    cache, which shares the block ids, so that the memory budget holds both."""
    cache, dtype = config.cache, spec.cache_dtype

    def shape_of(blocks: int) -> tuple[int, ...]:
        return cache_shape(spec, backend, num_layers, blocks)

    block_bytes = cache_block_bytes(spec, backend, num_layers)
    if cache.num_gpu_blocks_override is not None:
        num_blocks = cache.num_gpu_blocks_override
    else:
        free = platform.memory_info().free_bytes
        if cache.kv_cache_memory > free:
            raise ValueError(f"kv_cache_memory={cache.kv_cache_memory} bytes exceeds the {free} bytes free "
                             f"on {platform.name}; lower kv_cache_memory")
        num_blocks = cache.kv_cache_memory // (block_bytes + draft_block_bytes)
    num_host_blocks = cache.swap_space // block_bytes if cache.preemption_mode == "swap" else 0
    # Pipeline stages hold different layers, so different blocks in the same budget: the scheduler's are all's.
    num_blocks, num_host_blocks = fewest_over_ranks([num_blocks, num_host_blocks], platform.device)
    max_len = config.model.max_model_len
    if num_blocks * spec.block_size < tokens_held(spec, config) and config.model.max_model_len_from_model:
        config.model.max_model_len = num_blocks * spec.block_size
        logger.info("max_model_len is %d, not the model's %d: the KV cache holds %d tokens (%d blocks); set "
                    "max_model_len or a larger KV cache to choose", config.model.max_model_len, max_len,
                    config.model.max_model_len, num_blocks)
    elif num_blocks * spec.block_size < tokens_held(spec, config):
        raise ValueError(f"the KV cache holds {num_blocks * spec.block_size} tokens ({num_blocks} blocks), "
                         f"fewer than a sequence may hold ({tokens_held(spec, config)} tokens, for max_model_len="
                         f"{max_len}); raise kv_cache_memory (or num_gpu_blocks_override) or lower max_model_len")
    device = platform.device
    populating = None
    if device.type == "cpu":
        device_cache, populating = host_zeros(shape_of(num_blocks), dtype)
    else:
        device_cache = torch.zeros(shape_of(num_blocks), dtype=dtype, device=device)
    # Pinned host memory makes the copies to and from the device fast; plain memory when the device is the host.
    host_cache = torch.zeros(shape_of(num_host_blocks), dtype=dtype,
                             pin_memory=device.type != "cpu") if num_host_blocks else None
    return KvCache(num_blocks, block_bytes, device_cache, host_cache, num_host_blocks, populating)


def blocks_without_cache(config: EngineConfig, num_layers: int, platform: Platform) -> KvCache:
    """For an encoder, which keeps no keys and values: no cache memory, only the block ids that its fullest step
    takes (each of its sequences finishes in the step that computes it), so that the scheduler admits as usual."""
    scheduler = config.scheduler
    num_blocks = -(-scheduler.max_num_batched_tokens // config.cache.block_size) + scheduler.max_num_seqs
    return KvCache(num_blocks, 0, torch.empty(num_layers, 0, device=platform.device), None, 0)


def bind_kv_scales(layers: list[Attention], spec: AttentionSpec, calculate: bool) -> None:
    """Give an FP8 cache's layers their checkpoint's scales, or 1.0, or with ``calculate`` those of the first
    batch's keys and values; other caches ignore a checkpoint's."""
    scaled = [layer.checkpoint_kv_scales is not None for layer in layers]
    if spec.kv_cache_dtype is None:
        if any(scaled):
            logger.info("the checkpoint's KV cache scales are unused: the KV cache is in %s (kv_cache_dtype='auto')",
                        str(spec.dtype).removeprefix("torch."))
        return
    if calculate:
        if any(scaled):
            logger.info("the checkpoint's KV cache scales give way to the first batch's (calculate_kv_scales)")
        for layer in layers:
            layer.first_batch_level = torch.finfo(spec.kv_cache_dtype).max / FIRST_BATCH_HEADROOM
        return
    if not all(scaled):
        logger.warning("%d of %d attention layers have no KV cache scales in the checkpoint; they use 1.0, "
                       "which may cost accuracy", scaled.count(False), len(layers))
    for layer in layers:
        layer.kv_scales = layer.checkpoint_kv_scales or (1.0, 1.0)
