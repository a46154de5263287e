"""W8A8 FP8 GEMMs ("w8a8_fp8" per output channel) on the FP8 tensor cores through ``torch._scaled_mm`` (NVIDIA
sm89+, AMD MI300+): each call quantizes its inputs to FP8, per token or with the checkpoint's static scale, and
one row-wise scaled matmul sums in float32 and applies both scales. AMD's MI300 (gfx94x) multiplies e4m3fnuz,
whose exponent bias is one more than e4m3fn's: the same bits are half the value, so every scale doubles and the
inputs round exactly as they would to e4m3fn."""
from __future__ import annotations

from typing import Callable

import torch

from kvserve.kernels_cuda.scaled_gemm import input_scales
from kvserve.plugins.interfaces import QuantizedWeight

MIN_ABS_MAX = 1e-12
# The widths cuBLASLt and CUTLASS tile by: mat1's K and mat2's K and N.
DIMENSION_MULTIPLE = 16


def scale_factor(fp8_dtype: torch.dtype) -> float:
    """What an e4m3fn scale is multiplied by for the same bits in ``fp8_dtype`` to keep their value."""
    factors = {torch.float8_e4m3fn: 1.0, torch.float8_e4m3fnuz: 2.0}
    if fp8_dtype not in factors:
        raise ValueError(f"FP8 GEMMs multiply float8_e4m3fn or float8_e4m3fnuz, not {fp8_dtype}")
    return factors[fp8_dtype]


def as_fp8(weight: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """An e4m3fn weight's bits as ``fp8_dtype``."""
    if fp8_dtype == weight.dtype:
        return weight
    bits = weight.view(torch.int8)
    return torch.where(bits == -128, 0, bits).view(fp8_dtype)   # e4m3fn's -0 is e4m3fnuz's NaN


def fp8_gemm(weight: QuantizedWeight, fp8_dtype: torch.dtype = torch.float8_e4m3fn
             ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """``x @ W.T + bias`` for a per-channel "w8a8_fp8" weight, or None for other schemes, groups of inputs, and
    widths that are not multiples of 16. The output is in the model dtype, rounded once from float32 sums."""
    out_features, in_features = weight.shape
    tensors = weight.tensors
    if (weight.scheme != "w8a8_fp8" or tensors["scale"].dim() != 1
            or in_features % DIMENSION_MULTIPLE or out_features % DIMENSION_MULTIPLE):
        return None
    factor = scale_factor(fp8_dtype)
    columns = as_fp8(tensors["weight"], fp8_dtype).T   # column-major [in, out], as _scaled_mm requires
    column_scales = (tensors["scale"].float() * factor)[None, :].contiguous()
    fp8_max = torch.finfo(torch.float8_e4m3fn).max / factor
    static_scale = tensors["input_scale"].float() * factor if "input_scale" in tensors else None

    def linear(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, in_features).float()
        if static_scale is None:
            row_scales = input_scales(rows, in_features, fp8_max, MIN_ABS_MAX)
        else:
            row_scales = static_scale.reshape(1, 1).expand(rows.shape[0], 1).contiguous()
        fp8_rows = (rows / row_scales).clamp(-fp8_max, fp8_max).to(fp8_dtype)
        fused_bias = bias is not None and x.dtype != torch.float32   # _scaled_mm's bias: half-precision outputs
        out = torch._scaled_mm(fp8_rows, columns, scale_a=row_scales, scale_b=column_scales,
                               bias=bias.to(x.dtype) if fused_bias else None, out_dtype=x.dtype)
        if bias is not None and not fused_bias:
            out += bias
        return out.view(*x.shape[:-1], out_features)

    return linear
