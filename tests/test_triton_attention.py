"""The Triton paged-attention kernels against the direct reference: on a GPU when there is one, otherwise on
CPU tensors under Triton's interpreter (conftest chooses it)."""
from __future__ import annotations

import pytest
import torch

from kvserve.conformance.attention import NUM_HEADS, NUM_KV_HEADS, SHAPES, check_against_reference
from kvserve.plugins.interfaces import AttentionSpec, StepLayout

pytestmark = pytest.mark.triton
pytest.importorskip("triton")
from kvserve.platforms.cuda.attention import TritonPagedAttention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend(head_size: int, block_size: int, dtype: torch.dtype, window: int | None,
            cache_dtype: torch.dtype | None = None, soft_cap: float | None = None) -> TritonPagedAttention:
    spec = AttentionSpec(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_size=head_size, dtype=dtype,
                         block_size=block_size, sliding_window=window, kv_cache_dtype=cache_dtype,
                         logits_soft_cap=soft_cap)
    return TritonPagedAttention(spec, DEVICE)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("head_size, block_size", [(8, 4), (64, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_paged_attention_matches_reference(shapes, window, head_size, block_size, dtype):
    check_against_reference(backend(head_size, block_size, dtype, window), shapes, head_size, block_size, dtype,
                            window, DEVICE)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("window", [None, 5])
def test_soft_capped_scores_match_reference(shapes, window):
    check_against_reference(backend(64, 16, torch.float32, window, soft_cap=2.0), shapes, 64, 16, torch.float32,
                            window, DEVICE)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fp8_caches_attend_keys_and_values_as_they_hold_them(shapes, cache_dtype, dtype):
    if TritonPagedAttention.unsupported_reasons(backend(8, 4, dtype, None, cache_dtype).spec):
        pytest.skip("this GPU keeps no FP8 cache")
    check_against_reference(backend(8, 4, dtype, None, cache_dtype), shapes, 8, 4, dtype, None, DEVICE, cache_dtype)


@pytest.mark.parametrize("window, soft_cap", [(None, None), (20, None), (20, 2.0)])
def test_split_kv_decodes_match_reference(window, soft_cap):
    # Partitions of 16 keys: contexts of 33-70 keys split into 3-5 partitions, one of them partly masked.
    attention = backend(64, 16, torch.float32, window, soft_cap=soft_cap)
    attention.partition_len = 16
    shapes = [(69, 1), (32, 1), (50, 1)]
    assert attention.build_metadata(_layout(shapes)).num_partitions == 5
    check_against_reference(attention, shapes, 64, 16, torch.float32, window, DEVICE)


def _layout(shapes):
    return StepLayout(query_lens=[n for _, n in shapes], seq_lens=[c + n for c, n in shapes],
                      block_tables=[list(range(-(-(c + n) // 16))) for c, n in shapes], num_decodes=len(shapes))
