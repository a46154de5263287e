"""The GPU platforms' Triton fused ops agree with the torch references they replace: on a GPU when there is
one, otherwise on CPU tensors under Triton's interpreter (conftest chooses it). The interpreter (triton 3.9)
truncates float32 to bfloat16 where GPUs round to nearest even, whatever the rounding mode asked for: there,
bfloat16 results may differ by one more ulp."""
from __future__ import annotations

import os

import pytest
import torch

from kvserve.conformance.ops import (check_add_rms_norm, check_rms_norm, check_rotary_on_strided_views,
                                     check_silu_and_mul)

pytestmark = pytest.mark.triton
pytest.importorskip("triton")
from kvserve.kernels_cuda.fused_ops import FUSED_OPS  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])


def ulps(dtype: torch.dtype) -> int:
    return 2 if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" else 1


@DTYPES
def test_rms_norm(dtype):
    torch.manual_seed(0)
    check_rms_norm(FUSED_OPS, dtype, DEVICE, ulps(dtype))
    check_add_rms_norm(FUSED_OPS, dtype, DEVICE, ulps(dtype))


@DTYPES
def test_silu_and_mul(dtype):
    torch.manual_seed(0)
    check_silu_and_mul(FUSED_OPS, dtype, DEVICE, ulps(dtype))


@DTYPES
@pytest.mark.parametrize("head_size, rotary_dim", [(64, 64), (24, 16)])
def test_rotary_embedding_on_strided_views(dtype, head_size, rotary_dim):
    torch.manual_seed(0)
    check_rotary_on_strided_views(FUSED_OPS, dtype, DEVICE, head_size, rotary_dim, ulps(dtype))
