"""FP8 (e4m3) weights: "w8a8_fp8", whose inputs are quantized to e4m3 too at run time, and the weight-only
"w8a16_fp8". A weight is ``weight`` float8_e4m3fn ``[out, in]`` times ``scale`` float32: ``[out]`` (per channel; a
per-tensor scale repeated), or ``[out, ceil(in / g)]`` per output and group of g inputs (``group_size`` g: a
checkpoint's blocks of g x g weights, their scales repeated for each of a block's outputs, so that merged layers'
shards join whatever their sizes). W8A8 inputs take a static per-tensor ``input_scale`` where the checkpoint has
one, else a dynamic scale per token (per-channel weights) or per group of g inputs of each token (grouped
weights), ``max|x| / 448``. The products are summed in float32, as FP8 GEMMs do."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.plugins.interfaces import QuantizedWeight

SCHEME = "w8a8_fp8"
WEIGHT_ONLY = "w8a16_fp8"
FP8_MAX = 448.0   # e4m3's largest finite value
MIN_ABS_MAX = 1e-12


def quantize_weight(weight: torch.Tensor) -> QuantizedWeight:
    """Online FP8: per output channel, weight ~= fp8(weight / scale) * scale with scale = max|row| / 448."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=MIN_ABS_MAX) / FP8_MAX
    fp8 = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight(SCHEME, {"weight": fp8, "scale": scale}, tuple(weight.shape), dtype=weight.dtype)


def expanded_scale(weight: QuantizedWeight) -> torch.Tensor:
    """The scale of every weight, [out, in]."""
    scale = weight.tensors["scale"].float()
    if scale.dim() == 1:
        return scale[:, None].expand(weight.shape)
    return scale.repeat_interleave(weight.group_size, 1)[:, :weight.shape[1]]


def dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    return (weight.tensors["weight"].float() * expanded_scale(weight)).to(dtype)


def fake_quantize_inputs(weight: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    """x rounded to the e4m3 steps of its scale, in float32: what an FP8 GEMM multiplies."""
    x = x.float()
    if "input_scale" in weight.tensors:
        scale = weight.tensors["input_scale"].float().reshape(())
        return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    group = weight.group_size if weight.tensors["scale"].dim() == 2 else x.shape[-1]   # else per token
    padded = F.pad(x, (0, -x.shape[-1] % group)).unflatten(-1, (-1, group))
    scale = padded.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_ABS_MAX) / FP8_MAX
    rounded = (padded / scale).to(torch.float8_e4m3fn).float() * scale
    return rounded.flatten(-2)[..., :x.shape[-1]]


def reference_kernel(weight: QuantizedWeight):
    """The portable matmul: the weight dequantized at each call (one layer's at a time); W8A8 inputs rounded to
    their e4m3 steps and the products summed in float32."""
    def linear(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if weight.scheme == WEIGHT_ONLY:
            return F.linear(x, dequantize(weight, x.dtype), None if bias is None else bias.to(x.dtype))
        out = F.linear(fake_quantize_inputs(weight, x), dequantize(weight, torch.float32),
                       None if bias is None else bias.float())
        return out.to(x.dtype)

    return linear


def stored_weight(weight: torch.Tensor, scale: torch.Tensor, block: int | None, input_scale: torch.Tensor | None,
                  scheme: str = SCHEME) -> QuantizedWeight:
    """A checkpoint's e4m3 ``weight`` and its ``scale``: per tensor or channel, or per g x g block (``block`` g,
    [ceil(out / g), ceil(in / g)], each block's scale then repeated for its outputs); a static ``input_scale``."""
    out_features = weight.shape[0]
    scale = (scale.float().repeat_interleave(block, 0)[:out_features] if block else
             scale.float().reshape(-1).expand(out_features))
    tensors = {"weight": weight, "scale": scale.contiguous()}
    if input_scale is not None:
        tensors["input_scale"] = input_scale.float().reshape(())
    return QuantizedWeight(scheme, tensors, tuple(weight.shape), block)
