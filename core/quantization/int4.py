"""W4A16 int4: each output channel's inputs in groups of ``group_size`` (the last group may be shorter), each group
spread over 16 levels from its smallest to its largest weight (a float16 scale and offset per group, as GGUF's
Q4_1 rounds), round to nearest; activations stay in the model dtype. GPTQ and AWQ weights ((q - zero) * scale) and
GGUF Q4_0 / Q4_1 blocks (d * q + m) are the same arithmetic once unpacked."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.plugins.interfaces import QuantizedWeight

SCHEME = "w4a16_int4"
GROUP_SIZE = 32
MIN_SCALE = 2.0 ** -24   # a group of equal weights still gets a scale: float16's smallest
FLOAT16_MAX = 65504.0


def quantize_weight(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> QuantizedWeight:
    """weight ~= qweight * scale[:, g] + offset[:, g] for input k in group g = k // group_size."""
    w = weight.detach().float()
    if w.abs().amax() > FLOAT16_MAX / 2:   # a group's range must be a float16 too
        raise ValueError(f"int4 stores scales and offsets in float16: a weight of {w.abs().amax().item():g} "
                         f"exceeds the range it allows, |weight| <= {FLOAT16_MAX / 2:g}")
    out_features, in_features = w.shape
    groups = -(-in_features // group_size)
    # A short last group is padded with copies of its last weight, which leave its range as it is.
    padded = torch.cat([w, w[:, -1:].expand(-1, groups * group_size - in_features)], dim=1)
    padded = padded.view(out_features, groups, group_size)
    low = padded.amin(dim=2).half()
    # The levels are chosen for the scale and offset as stored: float16, rounded first.
    scale = ((padded.amax(dim=2) - low.float()) / 15).clamp(min=MIN_SCALE).half()
    q = torch.round((padded - low.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    qweight = q.view(out_features, -1)[:, :in_features].to(torch.uint8)
    return QuantizedWeight(SCHEME, {"qweight": qweight, "scale": scale, "offset": low}, (out_features, in_features),
                           group_size, weight.dtype)


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
