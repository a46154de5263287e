"""compressed-tensors checkpoints (``quant_method`` "compressed-tensors"), as llm-compressor and AutoRound's
llm_compressor export write them. Each of the config's ``config_groups`` names the layers it covers
(``targets``: "Linear", a layer name, or "re:" and a regular expression), how their weights are quantized and how
their inputs are; ``ignore`` lists layers left in the model dtype (the output head).

- "pack-quantized" (W4A16, W8A16): ``weight_packed`` int32 ``[out, in * b / 32]`` holds input (32 / b) i + j of
  each output in bits b j on of word i, as the signed level plus 2^(b - 1); ``weight_scale`` ``[out, groups]``;
  ``weight_zero_point`` (asymmetric only) int32 ``[out * b / 32, groups]``, packed likewise along the outputs;
  ``weight_shape`` ``[out, in]``; ``weight_g_idx`` (act-order). Read as "w4a16_int4" or "w8a16_int8".
- "int-quantized" / "naive-quantized": ``weight`` int8 ``[out, in]`` and ``weight_scale`` ``[out, 1]`` (per
  channel) or ``[1]``: with dynamic per-token int8 inputs, the W8A8 scheme "w8a8_int8", else "w8a16_int8".
- "float-quantized" / "naive-quantized" of float weights: ``weight`` float8_e4m3fn, ``weight_scale`` per tensor,
  channel or square block (``block_structure``), and with static inputs ``input_scale``: "w8a8_fp8" (inputs
  dynamic per token, or per group of a block's width of inputs, or static) or the weight-only "w8a16_fp8".

Weight = (level - zero point) * scale throughout.
"""
from __future__ import annotations

import re

import torch

from kvserve.core.quantization import fp8, int8
from kvserve.core.quantization.grouped import SCHEME_OF_BITS, unpack_fields
from kvserve.plugins.interfaces import QuantizedWeight

FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
PARTS = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx", "input_scale")
STORED = (torch.int8, torch.float8_e4m3fn)   # the dtypes of a quantized layer's ``weight``


def allowed(what: str, value, supported) -> None:
    if value not in supported:
        raise ValueError(f"compressed-tensors checkpoints with {what}={value!r} are not supported; supported: "
                         f"{', '.join(map(repr, supported))}")


def check_group(name: str, group: dict, default_format: str | None) -> tuple[str, dict, dict | None]:
    """(format, weight args, input activation args) of one config group, or a clear error for what kvserve does
    not run."""
    fmt, weights, inputs = group.get("format") or default_format, group.get("weights"), group.get("input_activations")
    allowed("format", fmt, FORMATS)
    if weights is None:
        raise ValueError(f"compressed-tensors config group {name!r} quantizes no weights; kvserve runs weight "
                         f"quantization (W4A16, W8A16, W8A8)")
    allowed("weights.type", weights.get("type"), ("int", "float"))
    if group.get("output_activations") is not None:
        raise ValueError("compressed-tensors checkpoints with output_activations are not supported")
    if weights["type"] == "float":
        check_float_group(fmt, weights, inputs)
        return fmt, weights, inputs
    allowed("weights.num_bits", weights.get("num_bits"), tuple(SCHEME_OF_BITS) if fmt == "pack-quantized" else (8,))
    allowed("weights.strategy", weights.get("strategy"), ("group", "channel", "tensor"))
    if inputs is not None:
        w8a8 = {"type": "int", "num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True}
        if fmt == "pack-quantized" or any(inputs.get(key) != value for key, value in w8a8.items()):
            raise ValueError(f"compressed-tensors input_activations {inputs} are not supported; supported: none "
                             f"(weight-only), or with int-quantized 8-bit weights {w8a8}")
        if not weights.get("symmetric", True) or weights["strategy"] == "group":
            raise ValueError(f"compressed-tensors W8A8 checkpoints with symmetric={weights.get('symmetric', True)} "
                             f"{weights['strategy']} weights are not supported; supported: symmetric, per channel "
                             f"or per tensor")
    return fmt, weights, inputs


def check_float_group(fmt: str, weights: dict, inputs: dict | None) -> None:
    allowed("format of float weights", fmt, ("float-quantized", "naive-quantized"))
    allowed("weights.num_bits", weights.get("num_bits"), (8,))
    allowed("weights.strategy", weights.get("strategy"), ("tensor", "channel", "block"))
    block = weights.get("block_structure")
    if weights["strategy"] == "block" and (len(block) != 2 or block[0] != block[1]):
        raise ValueError(f"compressed-tensors FP8 blocks of {block} are not supported; supported: square blocks")
    if inputs is None:
        return
    dynamic = ({"strategy": "group", "group_size": block[0]} if weights["strategy"] == "block" else
               {"strategy": "token"})
    supported = [{"type": "float", "num_bits": 8, "dynamic": True, **dynamic},
                 {"type": "float", "num_bits": 8, "dynamic": False, "strategy": "tensor"}]
    if not any(all(inputs.get(key) == value for key, value in case.items()) for case in supported):
        raise ValueError(f"compressed-tensors FP8 input_activations {inputs} are not supported with "
                         f"{weights['strategy']} weights; supported: none (weight-only), {supported[0]} or "
                         f"{supported[1]}")


def config_groups(quantization: dict) -> list[tuple[list[str], tuple[str, dict, dict | None]]]:
    """[(targets, (format, weight args, input args))] of each config group, checked."""
    allowed("quantization_status", quantization.get("quantization_status", "compressed"), ("compressed",))
    if quantization.get("sparsity_config"):
        raise ValueError("compressed-tensors checkpoints with a sparsity_config are not supported")
    kv_cache = quantization.get("kv_cache_scheme")
    if kv_cache and (kv_cache.get("type"), kv_cache.get("num_bits"), kv_cache.get("dynamic")) != ("float", 8, False):
        raise ValueError(f"compressed-tensors kv_cache_scheme {kv_cache} is not supported; supported: static FP8 "
                         f"scales (type 'float', num_bits 8, dynamic false), used with kv_cache_dtype='fp8'")
    groups = quantization.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    return [(group.get("targets", []), check_group(name, group, quantization.get("format")))
            for name, group in groups.items()]


def matches(layer: str, targets: list[str]) -> bool:
    """Whether one of compressed-tensors' targets (or ignore entries) names the layer: "Linear" names every linear
    layer (only those have quantized parts), "re:" a regular expression, else its name or a suffix of it."""
    for target in targets:
        if target == "Linear" or (target.startswith("re:") and re.match(target[3:], layer)):
            return True
        if layer == target or layer.endswith(f".{target}"):
            return True
    return False


def reader(quantization: dict):
    """(parts_of, build) for ``checkpoints.gather_layers``."""
    groups, ignore = config_groups(quantization), quantization.get("ignore") or []

    def scheme_of(layer: str) -> tuple[str, dict, dict | None]:
        for targets, scheme in groups:
            if matches(layer, targets):
                return scheme
        raise ValueError(f"compressed-tensors layer {layer!r} is quantized but no config group targets it")

    def parts_of(layer: str, part: str, tensor: torch.Tensor):
        quantized = part in PARTS or (part == "weight" and tensor.dtype in STORED)
        if not quantized or matches(layer, [target for target in ignore if target != "Linear"]):
            return None
        fmt, weights, inputs = scheme_of(layer)
        parts = ("weight_packed", "weight_shape", "weight_scale") if fmt == "pack-quantized" else ("weight",
                                                                                                  "weight_scale")
        if inputs is not None and not inputs.get("dynamic", True):
            parts += ("input_scale",)
        if not weights.get("symmetric", True):
            parts += ("weight_zero_point",)
        return parts + (("weight_g_idx",) if weights.get("actorder") else ()), parts

    def build(layer: str, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        fmt, weights, inputs = scheme_of(layer)
        if weights["type"] == "float":
            return fp8_weight(parts, weights, inputs)
        bits, scale = weights["num_bits"], parts["weight_scale"]
        if fmt == "pack-quantized":
            out_features, in_features = (int(n) for n in parts["weight_shape"])
            levels = unpack_fields(parts["weight_packed"], bits).flatten(1)[:, :in_features]
        else:
            (out_features, in_features), levels = parts["weight"].shape, None
        scale = (scale.reshape(1, 1).expand(out_features, 1) if scale.numel() == 1 else scale.reshape(out_features, -1))
        if inputs is not None:   # W8A8: int8 weights, one scale per output
            return QuantizedWeight(int8.SCHEME, {"qweight": parts["weight"], "scale": scale.float().reshape(-1)},
                                   (out_features, in_features))
        offset = 1 << (bits - 1)   # levels and zero points are stored signed, or unsigned from 2^(b - 1)
        if levels is None:
            levels = (parts["weight"].int() + offset).to(torch.uint8)
        zero = torch.full(scale.shape, offset, dtype=torch.int32)
        if "weight_zero_point" in parts:
            stored = parts["weight_zero_point"]
            zero = (unpack_fields(stored.T, bits).flatten(1)[:, :out_features].T.int() if fmt == "pack-quantized"
                    else stored.int().reshape(out_features, -1) + offset)
        tensors = {"qweight": levels, "scale": scale.contiguous(), "zero": zero.contiguous()}
        if "weight_g_idx" in parts:
            tensors["g_idx"] = parts["weight_g_idx"].int()
        group_size = weights.get("group_size") or in_features
        return QuantizedWeight(SCHEME_OF_BITS[bits], tensors, (out_features, in_features), group_size)

    return parts_of, build


def fp8_weight(parts: dict[str, torch.Tensor], weights: dict, inputs: dict | None) -> QuantizedWeight:
    block = weights["block_structure"][0] if weights["strategy"] == "block" else None
    return fp8.stored_weight(parts["weight"], parts["weight_scale"], block, parts.get("input_scale"),
                             fp8.WEIGHT_ONLY if inputs is None else fp8.SCHEME)
