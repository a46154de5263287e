"""The GPU platforms' Triton W4A16 / W8A16 GEMM against the portable reference of the grouped schemes: on a GPU
when there is one, otherwise on CPU tensors under Triton's interpreter (conftest chooses it)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kvserve.core.quantization import grouped, int4
from kvserve.plugins.interfaces import QuantizedWeight

pytestmark = pytest.mark.triton
pytest.importorskip("triton")
from kvserve.kernels_cuda.quant_gemm import grouped_gemm, pack_levels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_levels_pack_along_the_inputs():
    levels = torch.zeros(2, 16, dtype=torch.uint8)
    levels[0, :8] = torch.arange(1, 9)
    levels[1, :4] = torch.tensor([255, 1, 2, 3])
    assert pack_levels(levels, 4)[0, 0].item() & 0xFFFFFFFF == 0x87654321   # input j of output 0 in bits 4j
    assert pack_levels(levels, 8)[0, 1].item() & 0xFFFFFFFF == 0x030201FF   # 4 inputs a word at 8 bits
    assert pack_levels(levels, 8).shape == (4, 2)


def weight_of(bits: int, variant: str, out_features: int, in_features: int, group_size: int) -> QuantizedWeight:
    torch.manual_seed(out_features + bits)
    weight = int4.quantize_weight(torch.randn(out_features, in_features) * 0.1, group_size)
    groups, top = in_features // group_size, (1 << bits) - 1
    tensors = dict(weight.tensors)
    if bits == 8:
        tensors.update(qweight=torch.randint(0, top + 1, (out_features, in_features), dtype=torch.uint8),
                       scale=tensors["scale"] / 16)
    if variant != "offset":
        del tensors["offset"]
        tensors["zero"] = torch.randint(0, top + 2, (out_features, groups))
    if variant == "zero+g_idx":
        tensors["g_idx"] = (torch.arange(in_features) // group_size)[torch.randperm(in_features)].int()
    scheme = grouped.SCHEME_OF_BITS[bits]
    return dataclasses.replace(weight, scheme=scheme, tensors={key: t.to(DEVICE) for key, t in tensors.items()})


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("out_features,in_features,group_size", [(64, 64, 32), (72, 256, 128)])
@pytest.mark.parametrize("variant", ["offset", "zero", "zero+g_idx"])   # GGUF-like, GPTQ/AWQ, GPTQ act-order
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_grouped_gemm_matches_the_reference(rows, out_features, in_features, group_size, variant, bits, dtype):
    weight = weight_of(bits, variant, out_features, in_features, group_size)
    x = torch.randn(rows, in_features, dtype=dtype, device=DEVICE)
    bias = torch.randn(out_features, dtype=dtype, device=DEVICE)
    kernel, reference = grouped_gemm(weight), grouped.reference_kernel(weight)
    for b in (None, bias):
        expected = reference(x.float(), None if b is None else b.float())   # the dequantized weight, exactly
        if dtype == torch.bfloat16:   # the weight rounded to bfloat16 as the reference rounds it, sums in float32
            expected = (x.float() @ grouped.dequantize(weight, dtype).float().T + (0 if b is None else b.float()))
        # bfloat16: the output's rounding, and the interpreter's truncation of each weight (see test_triton_ops.py)
        tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
        torch.testing.assert_close(kernel(x, b).float(), expected, **tolerance)


def test_groups_the_kernel_cannot_step_through_keep_the_reference():
    for in_features, group_size in ((80, 16), (96, 48)):   # a group, or the width, not a multiple of 32
        assert grouped_gemm(int4.quantize_weight(torch.randn(16, in_features), group_size)) is None
    weight = int4.quantize_weight(torch.randn(16, 64))
    uneven = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)   # act-order groups of 40 and 24 inputs
    assert grouped_gemm(dataclasses.replace(weight, tensors={**weight.tensors, "g_idx": uneven})) is None
