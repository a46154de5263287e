"""Scaled 8-bit GEMMs in Triton for the schemes whose weights are integers or e4m3 numbers times float32 scales:
"w8a8_int8", "w8a8_fp8" and "w8a16_fp8", per output channel or per output and group of inputs (block-wise FP8).
W8A8 inputs are quantized first, per token or per group of a token's inputs (or by a static scale), to levels that
the model dtype holds exactly; each K step then multiplies input levels by weight levels on the tensor cores with
float32 sums, and scales the step's sums by the input scale of its rows and the weight scale of its columns. The
e4m3 bytes become float16 by two bit operations on any GPU (the sign, then the rest under float16's exponent: 2^-8
of the value, which the scales take back), so MI300, Ampere and the interpreter run the same kernel."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvserve.kernels_cuda.paged_attention import DOTS_IN_FLOAT32, _dot
from kvserve.plugins.interfaces import QuantizedWeight

BLOCK_K = 32
E4M3_MAX = 448.0
E4M3_AS_FLOAT16 = 256.0   # an e4m3 byte's bits read as float16 are its value / 256
# scheme: (levels' largest magnitude, smallest scale's abs max), as the portable references bound them
INPUT_LEVELS = {"w8a8_int8": (127.0, 1e-6), "w8a8_fp8": (E4M3_MAX, 1e-12)}


@triton.jit
def _scaled_gemm_kernel(out, x, weight, x_scales, w_scales, bias, m, n, k, stride_x, x_group, w_group,
                        E4M3: tl.constexpr, X_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        IN_FLOAT32: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dtype = out.dtype.element_ty
    x_groups = (k + x_group - 1) // x_group
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        inputs = start + tl.arange(0, BLOCK_K)
        a = tl.load(x + rows[:, None] * stride_x + inputs[None, :], mask=(rows[:, None] < m) & (inputs[None, :] < k),
                    other=0.0)
        w = tl.load(weight + inputs[:, None] * n + cols[None, :], mask=(inputs[:, None] < k) & (cols[None, :] < n),
                    other=0)
        if E4M3:
            w = w.to(tl.int16)
            w = (((w & 0x80) << 8) | ((w & 0x7F) << 7)).to(tl.float16, bitcast=True)
        sums = _dot(a, w.to(tl.float32).to(dtype), IN_FLOAT32)   # the interpreter casts int8 to bfloat16 as NaN
        scale = tl.load(w_scales + (start // w_group) * n + cols, mask=cols < n, other=0.0)
        if X_SCALED:
            x_scale = tl.load(x_scales + rows * x_groups + start // x_group, mask=rows < m, other=0.0)
            sums *= x_scale[:, None]
        acc += sums * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rows[:, None] * n + cols[None, :], acc.to(dtype), mask=(rows[:, None] < m) & (cols[None, :] < n))


def input_scales(rows: torch.Tensor, group: int, largest: float, min_abs_max: float) -> torch.Tensor:
    """float32 [rows, ceil(width / group)]: each group of a row's inputs over ``largest``, its biggest level."""
    padded = F.pad(rows.float(), (0, -rows.shape[1] % group)).unflatten(-1, (-1, group))
    return padded.abs().amax(dim=-1).clamp(min=min_abs_max) / largest


def quantized_inputs(rows: torch.Tensor, scheme: str, group: int, static_scale: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels in the rows' dtype, float32 scales [rows, groups]): W8A8 inputs as the portable references round
    them, int8 half to even and e4m3 to its nearest number."""
    largest, min_abs_max = INPUT_LEVELS[scheme]
    if static_scale is None:
        scales = input_scales(rows, group, largest, min_abs_max)
    else:
        scales, group = static_scale.float().reshape(1, 1).expand(rows.shape[0], 1).contiguous(), rows.shape[1]
    divided = (rows.float() / scales.repeat_interleave(group, 1)[:, :rows.shape[1]]).clamp(-largest, largest)
    levels = torch.round(divided) if scheme == "w8a8_int8" else divided.to(torch.float8_e4m3fn)
    return levels.to(rows.dtype), scales


def scaled_gemm(weight: QuantizedWeight) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """``x @ W.T + bias`` for a "w8a8_int8", "w8a8_fp8" or "w8a16_fp8" weight, or None for other schemes and for
    groups of inputs that are not multiples of 32 (a K step's)."""
    out_features, in_features = weight.shape
    tensors, scheme = weight.tensors, weight.scheme
    grouped = tensors["scale"].dim() == 2
    if scheme not in ("w8a8_int8", "w8a8_fp8", "w8a16_fp8") or (grouped and weight.group_size % BLOCK_K):
        return None
    e4m3 = scheme != "w8a8_int8"
    levels = tensors["weight"].view(torch.uint8) if e4m3 else tensors["qweight"]
    columns = levels.T.contiguous()   # [in, out]
    w_scales = (tensors["scale"].float() * (E4M3_AS_FLOAT16 if e4m3 else 1.0)).reshape(out_features, -1)
    w_scales, w_group = w_scales.T.contiguous(), weight.group_size if grouped else in_features
    quantizes_inputs = scheme != "w8a16_fp8"
    static_scale = tensors.get("input_scale")

    def linear(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, in_features)
        rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        x_scales, x_group = None, in_features
        if quantizes_inputs:
            x_group = w_group if grouped and static_scale is None else in_features
            rows, x_scales = quantized_inputs(rows, scheme, x_group, static_scale)
        out = torch.empty((rows.shape[0], out_features), dtype=x.dtype, device=x.device)
        block_m = 16 if rows.shape[0] <= 16 else 64
        grid = (triton.cdiv(rows.shape[0], block_m), triton.cdiv(out_features, 64))
        if rows.shape[0]:
            _scaled_gemm_kernel[grid](out, rows, columns, x_scales if quantizes_inputs else out, w_scales,
                                      bias if bias is not None else out, rows.shape[0], out_features, in_features,
                                      rows.stride(0), x_group, w_group, E4M3=e4m3, X_SCALED=quantizes_inputs,
                                      HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=BLOCK_K,
                                      IN_FLOAT32=DOTS_IN_FLOAT32)
        return out.view(*x.shape[:-1], out_features)

    return linear
