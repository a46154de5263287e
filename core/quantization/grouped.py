"""Weight-only integer schemes in groups of inputs, activations in the model dtype: W4A16 ("w4a16_int4", levels
0-15) and W8A16 ("w8a16_int8", levels 0-255). Each output channel's inputs are in groups of ``group_size`` (the
last possibly shorter, or as ``g_idx`` assigns them), each group with a scale and either an offset (weight =
level * scale + offset: online int4, GGUF) or a zero point (weight = (level - zero) * scale: GPTQ, AWQ,
compressed-tensors)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.plugins.interfaces import GROUPED_BITS, QuantizedWeight

W4A16 = "w4a16_int4"
W8A16 = "w8a16_int8"
SCHEME_OF_BITS = {bits: scheme for scheme, bits in GROUPED_BITS.items()}


def unpack_fields(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, cols] -> uint8 [rows, cols, 32 / bits]: field j (bits ``bits * j`` on) of each word at [..., j],
    as GPTQ, AWQ and compressed-tensors pack levels and zero points."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return ((packed.int()[..., None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8)


def groups_of_inputs(weight: QuantizedWeight) -> torch.Tensor:
    """The group of each input: ``g_idx`` where a checkpoint reorders them (GPTQ's act-order), else k // group."""
    if "g_idx" in weight.tensors:
        return weight.tensors["g_idx"].long()
    return torch.arange(weight.shape[1], device=weight.tensors["qweight"].device) // weight.group_size


def dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    qweight, scale = weight.tensors["qweight"].float(), weight.tensors["scale"].float()
    group = groups_of_inputs(weight)
    if "zero" in weight.tensors:
        return ((qweight - weight.tensors["zero"].float()[:, group]) * scale[:, group]).to(dtype)
    return (qweight * scale[:, group] + weight.tensors["offset"].float()[:, group]).to(dtype)


def reference_kernel(weight: QuantizedWeight):
    """The portable matmul: the layer's weight dequantized to the input's dtype at each call (only one layer's at a
    time, so the model's memory stays quantized), then torch's linear."""
    def linear(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, dequantize(weight, x.dtype), None if bias is None else bias.to(x.dtype))

    return linear
