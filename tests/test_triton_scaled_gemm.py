"""The GPU platforms' Triton GEMM for int8 and FP8 weights ("w8a8_int8", "w8a8_fp8", "w8a16_fp8") against their
portable references: on a GPU when there is one, otherwise on CPU tensors under Triton's interpreter."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kvserve.core.quantization import fp8, int8

pytestmark = pytest.mark.triton
pytest.importorskip("triton")
from kvserve.kernels_cuda.scaled_gemm import scaled_gemm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OUT, IN = 72, 160


def fp8_weight(scales: str, scheme: str):
    torch.manual_seed(len(scales) + len(scheme))
    master = torch.randn(OUT, IN) * 0.05
    if scales == "per-channel":
        weight = fp8.quantize_weight(master)
    else:   # 64 x 64 blocks, as DeepSeek's 128 x 128 ones in small
        block_scales = torch.rand(2, 3) * 1e-3 + 1e-4
        values = (master / block_scales.repeat_interleave(64, 0)[:OUT].repeat_interleave(64, 1)[:, :IN])
        weight = fp8.stored_weight(values.clamp(-448, 448).to(torch.float8_e4m3fn), block_scales, 64, None)
    weight.tensors["weight"][0, :4] = torch.tensor([-0.0, 448.0, -448.0, 2.0 ** -9])   # signs, the ends, subnormal
    if scales == "static":
        weight.tensors["input_scale"] = torch.tensor(0.01)
    return dataclasses.replace(weight, scheme=scheme)


def weight_of(case: str):
    if case == "int8":
        torch.manual_seed(0)
        weight = int8.quantize_weight(torch.randn(OUT, IN) * 0.05)
        weight.tensors["qweight"][0, :2] = torch.tensor([-127, 127], dtype=torch.int8)
        return weight, int8.reference_kernel
    scheme, scales = case.split(":")
    return fp8_weight(scales, scheme), fp8.reference_kernel


CASES = ["int8", "w8a8_fp8:per-channel", "w8a8_fp8:block", "w8a8_fp8:static", "w8a16_fp8:per-channel",
         "w8a16_fp8:block"]


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_scaled_gemm_matches_the_reference(rows, case, dtype):
    weight, reference_of = weight_of(case)
    weight = dataclasses.replace(weight, tensors={key: t.to(DEVICE) for key, t in weight.tensors.items()},
                                 dtype=dtype)
    x = torch.randn(2, rows, IN, dtype=dtype, device=DEVICE)
    x[0, 0, :3] = torch.tensor([0.0, 40.0, -1e-3])   # a large input sets its row's (or group's) scale
    bias = torch.randn(OUT, dtype=dtype, device=DEVICE)
    kernel, reference = scaled_gemm(weight), reference_of(weight)
    for b in (None, bias):
        expected, got = reference(x, b), kernel(x, b)
        assert got.shape == (2, rows, OUT) and got.dtype == dtype
        # float32: the same levels and scales, summed in another order. bfloat16: the output's rounding, and the
        # weight-only reference's weights rounded to bfloat16 before their products.
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_the_kernel_declines_groups_it_cannot_step_through():
    weight = fp8.stored_weight(torch.zeros(OUT, IN).to(torch.float8_e4m3fn), torch.ones(5, 10), 16, None)
    assert scaled_gemm(weight) is None   # a group of 16 inputs is half a K step
    assert scaled_gemm(dataclasses.replace(fp8_weight("block", "w8a8_fp8"), scheme="w4a16_int4")) is None
