"""The platform's attention backend against the reference: decodes, whole prompts, chunks after cached context
(chunked prefill, prefix-cache hits), grouped-query heads, contexts across block boundaries, sliding windows, and
FP8 caches where the backend keeps them."""
from __future__ import annotations

import pytest
import torch

from kvserve.conformance.attention import NUM_HEADS, NUM_KV_HEADS, SHAPES, check_against_reference
from kvserve.plugins.interfaces import AttentionSpec

# (head size, block size, sliding window, soft cap): a common model's, a larger head's, a window shorter than a
# block, and Gemma 2's layers (capped, with and without a window), with a cap low enough to change the softmax.
LAYOUTS = [(64, 16, None, None), (128, 16, None, None), (64, 32, 12, None), (64, 16, None, 2.0), (64, 16, 12, 2.0)]
FP8_TYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def backend_for(platform, spec: AttentionSpec):
    try:
        backend_cls = platform.attention_backend(spec)
    except ValueError as exc:
        pytest.skip(f"platform {platform.name!r} declines {spec}: {exc}")
    return backend_cls(spec, platform.device)


@pytest.mark.parametrize("head_size, block_size, window, soft_cap", LAYOUTS)
def test_attention_matches_the_reference(platform, dtype, head_size, block_size, window, soft_cap):
    spec = AttentionSpec(NUM_HEADS, NUM_KV_HEADS, head_size, dtype, block_size, window, logits_soft_cap=soft_cap)
    backend = backend_for(platform, spec)
    for shapes in SHAPES:
        check_against_reference(backend, shapes, head_size, block_size, dtype, window, platform.device)


@pytest.mark.parametrize("cache_type", list(FP8_TYPES))
def test_fp8_caches_attend_what_they_hold(platform, dtype, cache_type):
    cache_dtype = FP8_TYPES[cache_type]
    spec = AttentionSpec(NUM_HEADS, NUM_KV_HEADS, 64, dtype, 16, kv_cache_dtype=cache_dtype)
    backend = backend_for(platform, spec)
    if cache_dtype not in backend.kv_cache_dtypes:
        pytest.skip(f"attention backend {backend.name!r} keeps no {cache_type} cache")
    for shapes in SHAPES:
        check_against_reference(backend, shapes, 64, 16, dtype, None, platform.device, cache_dtype)
