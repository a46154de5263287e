"""The GPU platforms' FP8 GEMM (torch._scaled_mm) against the portable reference of "w8a8_fp8": on a GPU when there
is one, otherwise on CPU tensors, where torch runs _scaled_mm too."""
from __future__ import annotations

import pytest
import torch

from kvserve.core.quantization import fp8
from kvserve.kernels_cuda.fp8_gemm import fp8_gemm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weight_of(out_features: int, in_features: int, dtype: torch.dtype, static: bool):
    torch.manual_seed(out_features)
    weight = fp8.quantize_weight((torch.randn(out_features, in_features) * 0.05).to(dtype))
    weight.tensors["weight"][0, :3] = torch.tensor([-0.0, 0.0, -448.0])   # -0 has no e4m3fnuz twin
    if static:
        weight.tensors["input_scale"] = torch.tensor(0.02)
    weight.tensors.update({key: t.to(DEVICE) for key, t in weight.tensors.items()})
    return weight


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz], ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fp8_gemm_matches_the_reference(fp8_dtype, static, rows, dtype):
    weight = weight_of(48, 96, dtype, static)
    x = torch.randn(2, rows, 96, dtype=dtype, device=DEVICE)
    bias = torch.randn(48, dtype=dtype, device=DEVICE)
    kernel, reference = fp8_gemm(weight, fp8_dtype), fp8.reference_kernel(weight)
    for b in (None, bias):
        expected, got = reference(x, b), kernel(x, b)
        assert got.shape == (2, rows, 48) and got.dtype == dtype
        # The same e4m3 inputs and weights, summed in float32 in another order; bfloat16 rounds the sum once,
        # a fused bias after the sum.
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_fp8_gemm_declines_what_it_cannot_multiply():
    per_channel = weight_of(48, 96, torch.bfloat16, False)
    grouped = fp8.stored_weight(per_channel.tensors["weight"], torch.rand(1, 1, device=DEVICE), 128, None)
    assert fp8_gemm(grouped) is None   # scales per group of inputs
    assert fp8_gemm(weight_of(40, 96, torch.bfloat16, False)) is None   # 40 outputs: not a multiple of 16
    with pytest.raises(ValueError, match="float8_e4m3fn or float8_e4m3fnuz"):
        fp8_gemm(per_channel, torch.float8_e5m2)
