"""Checkpoints that tools export already quantized (their ``quantization_config``): GPTQ, as AutoGPTQ and GPTQModel
write it, AWQ's GEMM packing, as AutoAWQ writes it, and AutoRound's auto_round format, in either packing; all 4
bits, read as "w4a16_int4" weights with zero points.

GPTQ (``checkpoint_format`` "gptq"): a layer's ``qweight`` int32 ``[in / 8, out]`` holds input 8i + j of output o
in bits 4j to 4j + 3 of ``qweight[i, o]``; ``qzeros`` int32 ``[groups, out / 8]`` holds output 8i + j's zero point
in bits 4j to 4j + 3 of ``qzeros[g, i]``, minus one ("gptq_v2" stores it as it is); ``scales`` float16
``[groups, out]``; ``g_idx`` int32 ``[in]``, each input's group, which act-order (``desc_act``) permutes.
AWQ (``version`` "gemm"): ``qweight`` int32 ``[in, out / 8]`` holds output 8i + ORDER[j] of input k in bits 4j to
4j + 3 of ``qweight[k, i]``, ``qzeros`` int32 ``[groups, out / 8]`` the zero points likewise, ``scales`` float16
``[groups, out]``. In both, weight = (level - zero) * scale.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from kvserve.core.quantization import int4
from kvserve.plugins.interfaces import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble j of a packed word holds output AWQ_ORDER[j] of its 8
NIBBLES = torch.arange(0, 32, 4, dtype=torch.int32)
PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}
REQUIRED = ("qweight", "qzeros", "scales")
# method -> (the config key naming its packing, the values kvserve reads, its default first)
METHODS = {"gptq": ("checkpoint_format", ("gptq", "gptq_v2")), "awq": ("version", ("gemm",)),
           "auto-round": ("packing_format", ("auto_round:auto_gptq", "auto_round:auto_awq"))}


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols] -> uint8 [rows, cols, 8]: nibble j of each word at [..., j]."""
    return ((packed.int()[..., None] >> NIBBLES) & 0xF).to(torch.uint8)


def method_of(config) -> str | None:
    """The checkpoint's quantization method ("gptq", "awq", "auto-round"), or None if it has no
    quantization_config; a method or a variant kvserve does not read is a clear error."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    method = quantization.get("quant_method")
    if method not in METHODS:
        raise ValueError(f"checkpoint quantization method {method!r} is not supported; supported: "
                         f"{', '.join(map(repr, METHODS))}")
    if quantization.get("bits", 4) != 4:
        raise ValueError(f"{method} checkpoints of {quantization['bits']} bits are not supported; supported: 4")
    if quantization.get("data_type", "int") != "int":
        raise ValueError(f"{method} checkpoints with data_type={quantization['data_type']!r} are not supported; "
                         f"supported: 'int'")
    layout_of(quantization)
    return method


def layout_of(quantization: dict) -> tuple[str, bool]:
    """("gptq", whether zero points are stored minus one) or ("awq", False): how the layers are packed."""
    method = quantization["quant_method"]
    key, allowed = METHODS[method]
    value = str(quantization.get(key, allowed[0])).lower()
    if value not in allowed:
        raise ValueError(f"{method} checkpoints with {key}={value!r} are not supported; supported: "
                         f"{', '.join(map(repr, allowed))}")
    if method == "auto-round":   # its GPTQ packing stores zero points minus one, as GPTQ's own format does
        return ("awq", False) if "awq" in value else ("gptq", True)
    return (method, value == "gptq")


def gptq_weight(parts: dict[str, torch.Tensor], group_size: int, zeros_minus_one: bool) -> QuantizedWeight:
    qweight = unpack_nibbles(parts["qweight"].T).reshape(parts["qweight"].shape[1], -1)   # [out, in]
    out_features, in_features = qweight.shape
    zero = unpack_nibbles(parts["qzeros"]).reshape(parts["qzeros"].shape[0], -1)[:, :out_features].T
    tensors = {"qweight": qweight, "scale": parts["scales"].T.half().contiguous(),
               "zero": (zero + 1 if zeros_minus_one else zero).contiguous()}
    g_idx = parts.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features) // group_size):
        tensors["g_idx"] = g_idx.int()
    return QuantizedWeight(int4.SCHEME, tensors, (out_features, in_features), group_size)


def awq_weight(parts: dict[str, torch.Tensor], group_size: int) -> QuantizedWeight:
    order = torch.argsort(torch.tensor(AWQ_ORDER))   # position of output j among a word's nibbles

    def outputs_last(packed: torch.Tensor) -> torch.Tensor:
        return unpack_nibbles(packed)[..., order].reshape(packed.shape[0], -1)

    qweight = outputs_last(parts["qweight"]).T.contiguous()   # [out, in]
    out_features, in_features = qweight.shape
    tensors = {"qweight": qweight, "scale": parts["scales"].T.half().contiguous(),
               "zero": outputs_last(parts["qzeros"])[:, :out_features].T.contiguous()}
    return QuantizedWeight(int4.SCHEME, tensors, (out_features, in_features), group_size)


def read_quantized(weights: Iterable[tuple[str, torch.Tensor]], config
                   ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """The checkpoint's tensors, each quantized layer's parts joined into one QuantizedWeight named
    ``<layer>.weight`` once all of them have been read."""
    method, quantization = method_of(config), config.quantization_config
    packing, zeros_minus_one = layout_of(quantization)
    parts_of = PARTS[packing]
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        layer, _, part = name.rpartition(".")
        if part not in parts_of:
            yield name, tensor
            continue
        parts = pending.setdefault(layer, {})
        parts[part] = tensor
        if set(parts) != set(parts_of):
            continue
        del pending[layer]
        yield f"{layer}.weight", build(packing, zeros_minus_one, parts, quantization)
    for layer, parts in pending.items():   # AutoAWQ writes no g_idx, and GPTQ checkpoints may not either
        missing = [part for part in REQUIRED if part not in parts]
        if missing:
            raise ValueError(f"{method} layer {layer!r} lacks {', '.join(missing)}")
        yield f"{layer}.weight", build(packing, zeros_minus_one, parts, quantization)


def build(packing: str, zeros_minus_one: bool, parts: dict[str, torch.Tensor], quantization: dict
          ) -> QuantizedWeight:
    in_features = parts["qweight"].shape[0] * (8 if packing == "gptq" else 1)
    group_size = quantization.get("group_size", 128)
    group_size = in_features if group_size in (-1, None) else group_size
    if packing == "gptq":
        return gptq_weight(parts, group_size, zeros_minus_one)
    return awq_weight(parts, group_size)
