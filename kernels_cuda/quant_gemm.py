"""Weight-only int4 / int8 GEMMs (W4A16, W8A16) in Triton for the grouped schemes ("w4a16_int4", "w8a16_int8"):
each tile of levels is unpacked and dequantized in registers, weight = level * scale + shift (shift the group's
offset, or -zero * scale), rounded to the input dtype as the portable reference rounds it, then multiplied on the
tensor cores with float32 sums. The levels are packed once, 32 / bits to an int32 along the inputs ([in * bits /
32, out]); scales and shifts are float32 [groups, out]. A K step stays within one group."""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from kvserve.kernels_cuda.paged_attention import DOTS_IN_FLOAT32, _dot
from kvserve.plugins.interfaces import GROUPED_BITS, QuantizedWeight

BLOCK_K = 32


@triton.jit
def _grouped_gemm_kernel(out, x, words, scales, shifts, bias, m, n, k, stride_x, group_size,
                         BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, IN_FLOAT32: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    per_word: tl.constexpr = 32 // BITS
    dtype = out.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        inputs = start + tl.arange(0, BLOCK_K)
        a = tl.load(x + rows[:, None] * stride_x + inputs[None, :], mask=(rows[:, None] < m) & (inputs[None, :] < k),
                    other=0.0)
        packed = tl.load(words + (inputs // per_word)[:, None] * n + cols[None, :],
                         mask=(inputs[:, None] < k) & (cols[None, :] < n), other=0)
        levels = (packed >> ((inputs % per_word) * BITS)[:, None]) & ((1 << BITS) - 1)
        group = start // group_size
        scale = tl.load(scales + group * n + cols, mask=cols < n, other=0.0)
        shift = tl.load(shifts + group * n + cols, mask=cols < n, other=0.0)
        w = (levels.to(tl.float32) * scale[None, :] + shift[None, :]).to(dtype)
        acc += _dot(a, w, IN_FLOAT32)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rows[:, None] * n + cols[None, :], acc.to(dtype), mask=(rows[:, None] < m) & (cols[None, :] < n))


def pack_levels(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [out, in] -> int32 [in * bits / 32, out]: input (32 / bits) i + j of each output in bits bits * j of
    word i."""
    per_word = 32 // bits
    by_input = levels.T.to(torch.int64).reshape(-1, per_word, levels.shape[0])
    shifts = (torch.arange(per_word, device=levels.device) * bits)[None, :, None]
    words = (by_input << shifts).sum(1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()   # the same bits


def grouped_gemm(weight: QuantizedWeight) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """``x @ W.T + bias`` for a grouped weight, or None unless the width and the group size are multiples of 32 (a
    K step's) and act-order groups (``g_idx``) are of equal sizes; act-order inputs are gathered into their
    groups, the weight's columns once and each input row at every call."""
    out_features, in_features = weight.shape
    tensors, group_size, bits = weight.tensors, weight.group_size, GROUPED_BITS[weight.scheme]
    order, whole_groups = weight.input_order()
    if in_features % BLOCK_K or group_size % BLOCK_K or not whole_groups:
        return None
    levels = tensors["qweight"] if order is None else tensors["qweight"][:, order]
    scale = tensors["scale"].float()
    shift = -tensors["zero"].float() * scale if "zero" in tensors else tensors["offset"].float()
    words, scales, shifts = pack_levels(levels, bits), scale.T.contiguous(), shift.T.contiguous()

    def linear(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = (x if order is None else x.index_select(-1, order)).reshape(-1, in_features)
        rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        out = torch.empty((rows.shape[0], out_features), dtype=x.dtype, device=x.device)
        block_m = 16 if rows.shape[0] <= 16 else 64
        grid = (triton.cdiv(rows.shape[0], block_m), triton.cdiv(out_features, 64))
        if rows.shape[0]:
            _grouped_gemm_kernel[grid](out, rows, words, scales, shifts, bias if bias is not None else out,
                                       rows.shape[0], out_features, in_features, rows.stride(0), group_size,
                                       BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=64,
                                       BLOCK_K=BLOCK_K, IN_FLOAT32=DOTS_IN_FLOAT32)
        return out.view(*x.shape[:-1], out_features)

    return linear
