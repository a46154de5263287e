"""The platform's quantized matmuls (platform_quant_kernel) against each scheme's portable reference, which
dequantizes the weight and multiplies in the model dtype (activations quantized the same way for W8A8)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kvserve.core.quantization import fp8, grouped, int4, int8
from kvserve.core.quantization.online import REFERENCES
from kvserve.plugins.interfaces import QuantizedWeight

OUT_FEATURES, IN_FEATURES, GROUP = 96, 256, 32


def zero_points(weight: QuantizedWeight, bits: int, act_order: bool) -> QuantizedWeight:
    """The GPTQ/AWQ layout of a grouped weight: levels over ``bits``, integer zero points, and with ``act_order`` a
    g_idx that scatters each group's inputs."""
    top = (1 << bits) - 1
    tensors = {"qweight": torch.randint(0, top + 1, weight.tensors["qweight"].shape, dtype=torch.uint8),
               "scale": weight.tensors["scale"] / (1 << (bits - 4)),
               "zero": torch.randint(0, top + 1, weight.tensors["scale"].shape, dtype=torch.int32)}
    if act_order:
        tensors["g_idx"] = (torch.arange(IN_FEATURES) // GROUP)[torch.randperm(IN_FEATURES)].int()
    return dataclasses.replace(weight, scheme=grouped.SCHEME_OF_BITS[bits], tensors=tensors)


def fp8_blocks(weight: torch.Tensor, scheme: str) -> QuantizedWeight:
    """A checkpoint's FP8 weight in 16 x 16 blocks, each with its own scale."""
    scale = torch.rand(OUT_FEATURES // 16, IN_FEATURES // 16) * 0.01 + 1e-3
    levels = weight / scale.repeat_interleave(16, 0).repeat_interleave(16, 1)
    return fp8.stored_weight(levels.clamp(-448, 448).to(torch.float8_e4m3fn), scale, 16, None, scheme)


WEIGHTS = {
    "w8a8_int8": int8.quantize_weight,
    "w4a16_int4-offset": lambda w: int4.quantize_weight(w, GROUP),
    "w4a16_int4-zero-act-order": lambda w: zero_points(int4.quantize_weight(w, GROUP), 4, act_order=True),
    "w8a16_int8-zero": lambda w: zero_points(int4.quantize_weight(w, GROUP), 8, act_order=False),
    "w8a8_fp8-channel": fp8.quantize_weight,
    "w8a16_fp8-channel": lambda w: dataclasses.replace(fp8.quantize_weight(w), scheme=fp8.WEIGHT_ONLY),
    "w8a8_fp8-blocks": lambda w: fp8_blocks(w, fp8.SCHEME),
}


@pytest.mark.parametrize("variant", list(WEIGHTS))
def test_quantized_matmul_matches_the_reference(platform, dtype, variant):
    weight = WEIGHTS[variant](torch.randn(OUT_FEATURES, IN_FEATURES) * 0.1)
    device = platform.device
    weight = dataclasses.replace(weight, dtype=dtype, tensors={k: t.to(device) for k, t in weight.tensors.items()})
    try:
        kernel = platform.quant_kernel(weight)
    except ValueError as exc:
        pytest.skip(f"platform {platform.name!r} cannot run {weight.scheme}: {exc}")
    if kernel is None:
        pytest.skip(f"platform {platform.name!r} runs {variant} on the portable reference")
    reference = REFERENCES[weight.scheme](weight)
    bias = torch.randn(OUT_FEATURES, dtype=dtype, device=device)
    for rows in (1, 7, 64):
        x = torch.randn(rows, IN_FEATURES, dtype=dtype, device=device) * 4
        for b in (None, bias):
            expected = reference(x, b)
            # Kernels sum in other orders and tiles than torch's matmul: a few roundings of the largest output.
            scale = expected.abs().max().item() * (1e-5 if dtype == torch.float32 else 2e-2)
            torch.testing.assert_close(kernel(x, b), expected, rtol=0, atol=scale)
