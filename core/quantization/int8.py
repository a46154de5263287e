"""W8A8 int8: weights quantized per output channel ahead of time, activations per token at run time, both
symmetric to [-127, 127]."""
from __future__ import annotations

import torch

from kvserve.plugins.interfaces import QuantizedWeight

SCHEME = "w8a8_int8"
MIN_ABS_MAX = 1e-6   # a row of zeros still gets a finite scale; kernels use the same bound


def quantize_weight(weight: torch.Tensor) -> QuantizedWeight:
    """Round-to-nearest per output channel: weight ~= qweight * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=MIN_ABS_MAX) / 127
    qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight(SCHEME, {"qweight": qweight, "scale": scale}, tuple(weight.shape), dtype=weight.dtype)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers in [-127, 127] as float32, scale per row [..., 1]): the activations' dynamic quantization."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_ABS_MAX) / 127
    return torch.round(x.float() / scale), scale


def dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    return (weight.tensors["qweight"].float() * weight.tensors["scale"].float()[:, None]).to(dtype)


def reference_kernel(weight: QuantizedWeight):
    """The portable matmul: the integer products summed in float32, then both scales, as the kernels do."""
    qweight, scale = weight.tensors["qweight"], weight.tensors["scale"]

    def linear(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        qx, x_scale = quantize_tokens(x)
        out = (qx @ qweight.float().T) * x_scale * scale
        return (out if bias is None else out + bias.float()).to(x.dtype)

    return linear
