"""Online W4A16 int4 (the grouped scheme "w4a16_int4"): each output channel's inputs in groups of ``group_size``
(the last group may be shorter), each group spread over 16 levels from its smallest to its largest weight (a
float16 scale and offset per group, as GGUF's Q4_1 rounds), round to nearest; activations stay in the model
dtype."""
from __future__ import annotations

import torch

from kvserve.core.quantization.grouped import W4A16
from kvserve.plugins.interfaces import QuantizedWeight

SCHEME = W4A16
GROUP_SIZE = 32
GROUP_SIZES = (16, 32, 64, 128, 256)   # quantization_group_size's choices: multiples of the CPU kernel's 16
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
