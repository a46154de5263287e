"""Linear layers with weights laid out once for the kernel that multiplies them: the C++ bfloat16 kernel on CPUs
with AVX512-BF16, oneDNN's blocked layout otherwise, and the C++ kernels for W8A8 int8 (AVX512-VNNI) and
weight-only W4A16 / W8A16 (AVX512-BF16 or AVX2), and FP8 weights (AVX2)."""
from __future__ import annotations

from typing import Callable

import torch

from kvserve.kernels_cpu import native
from kvserve.plugins.interfaces import GROUPED_BITS, QuantizedWeight

# The batch size oneDNN picks the packed layout for: a decode step of a busy server. Other sizes still run.
PACKING_BATCH_SIZE = 32


def packed_linear(weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """``x @ weight.T + bias`` on the packed weight; None for float16 (no native float16 matmul on most CPUs),
    a torch built without oneDNN, or bfloat16 where oneDNN has no bfloat16 path (CPUs without AVX-512)."""
    weight = weight.detach()
    if weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0 and native.supported("bf16"):
        ops = native.load("bf16")[0]
        packed, width, linear_bf16 = ops.pack_linear_bf16(weight), weight.shape[0], ops.linear_bf16.default
        native.announce("bfloat16 linear layers", f"kvserve's bf16 kernel ({native.isa('bf16')})")
        return lambda x, bias: linear_bf16(x, packed, bias, width)
    if weight.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKING_BATCH_SIZE)
    native.announce(f"{str(weight.dtype).removeprefix('torch.')} linear layers", "oneDNN (torch's mkldnn linear)")

    def linear(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    return linear


def gate_up_linear(weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """``silu(x @ gate.T) * (x @ up.T)`` for a [gate; up] weight, SiLU-and-mul done on the matmul's tiles (no
    [tokens, 2 * intermediate] output written and read back); None unless the bfloat16 kernel runs it."""
    weight, intermediate = weight.detach(), weight.shape[0] // 2
    if weight.dtype != torch.bfloat16 or intermediate % 16 or weight.shape[1] % 2 or not native.supported("bf16"):
        return None
    ops = native.load("bf16")[0]
    packed, gate_up_bf16 = ops.pack_gate_up_bf16(weight), ops.gate_up_bf16.default
    native.announce("bfloat16 gate-up layers", f"kvserve's bf16 kernel with SiLU-and-mul ({native.isa('bf16')})")
    return lambda x, bias: gate_up_bf16(x, packed, bias, intermediate)


def int8_linear(qweight: torch.Tensor, scale: torch.Tensor
                ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """W8A8 on an int8 [out, in] weight with float32 scales per output: rows of x quantized per row to
    [-127, 127] (scale max|x| / 127), int32 sums, both scales applied; None without AVX512-VNNI."""
    if not native.supported("int8"):
        return None
    ops = native.load("int8")[0]
    (packed, shift), scale = ops.pack_linear_int8(qweight), scale.float().contiguous()
    native.announce("W8A8 int8 linear layers", f"kvserve's int8 kernel ({native.isa('int8')})")
    linear_int8 = ops.linear_int8.default

    def linear(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.bfloat16):
            return linear_int8(x, packed, shift, scale, bias)
        return linear_int8(x.float(), packed, shift, scale, bias).to(x.dtype)   # float16: no native path

    return linear


def grouped_linear(weight: QuantizedWeight) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """W4A16 or W8A16 on a "w4a16_int4" or "w8a16_int8" weight: bfloat16 inputs on AVX512-BF16 (the levels packed
    in nibbles and multiplied where they lie, each group's sums scaled once), float32 or bfloat16 on AVX2 (each
    level turned into its weight in registers). Act-order inputs (``g_idx``) are gathered into their groups, the
    weight's columns once and each input row at every call. The kernel keeps scales and offsets in float16 where
    float16 holds them all, else in float32 (GGUF's K-quants). None for other input dtypes or CPUs, unless the width
    and the group size are multiples of 16, for groups of unequal sizes, or for scales or offsets float32 does not
    hold exactly."""
    ops, tensors, group_size = native.load("grouped")[0], weight.tensors, weight.group_size
    dtype_name = str(weight.dtype).removeprefix("torch.")
    if not native.supported("grouped", dtype_name) or weight.shape[1] % 16 or group_size % 16:
        return None
    zero_points, bits = "zero" in tensors, GROUPED_BITS[weight.scheme]
    second = tensors["zero"] if zero_points else tensors["offset"]
    if not all(torch.equal(t.float().to(t.dtype), t) for t in (tensors["scale"], second)):
        return None
    order, whole_groups = weight.input_order()
    if not whole_groups:
        return None
    qweight = tensors["qweight"] if order is None else tensors["qweight"][:, order]
    packed, scales = ops.pack_linear_grouped(qweight, tensors["scale"], second, group_size, bits)
    native.announce(f"W{bits}A16 linear layers", f"kvserve's grouped kernel ({native.isa('grouped')})")
    linear_grouped, out_features = ops.linear_grouped.default, weight.shape[0]
    if order is None:
        return lambda x, bias: linear_grouped(x, packed, scales, bias, out_features, group_size, zero_points, bits)
    return lambda x, bias: linear_grouped(x.index_select(-1, order), packed, scales, bias, out_features, group_size,
                                          zero_points, bits)


def fp8_linear(weight: QuantizedWeight) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """A "w8a16_fp8" or "w8a8_fp8" weight (e4m3, scales per output or per output and group) for float32 or
    bfloat16 inputs: the bytes turned into floats in registers, float32 products; W8A8 inputs rounded to their e4m3
    steps first (the checkpoint's static scale, else per token or per group). None without AVX2, or unless the
    width and the group size are multiples of 4."""
    ops, tensors = native.load("fp8")[0], weight.tensors
    if weight.dtype not in (torch.float32, torch.bfloat16) or weight.shape[1] % 4 or not native.supported("fp8"):
        return None
    group = weight.group_size if tensors["scale"].dim() == 2 else weight.shape[1]
    if group % 4:
        return None
    packed, scales = ops.pack_linear_fp8(tensors["weight"], tensors["scale"].float(), group)
    native.announce("FP8 linear layers", f"kvserve's fp8 kernel ({native.isa('fp8')})")
    input_group = group if weight.scheme == "w8a8_fp8" else 0
    input_scale = float(tensors["input_scale"]) if "input_scale" in tensors else 0.0
    linear_fp8, out_features = ops.linear_fp8.default, weight.shape[0]
    return lambda x, bias: linear_fp8(x, packed, scales, bias, out_features, group, input_group, input_scale)
