"""Checkpoints that tools export already quantized (their ``quantization_config``): GPTQ, as AutoGPTQ and GPTQModel
write it (4 or 8 bits), AWQ's GEMM packing, as AutoAWQ writes it (4 bits), AutoRound's auto_round format in either
packing, compressed-tensors (``compressed_tensors``), and FP8; read as "w4a16_int4" or "w8a16_int8" weights with
zero points, "w8a8_int8", "w8a8_fp8" or "w8a16_fp8".

GPTQ (``checkpoint_format`` "gptq"): with b bits, a layer's ``qweight`` int32 ``[in * b / 32, out]`` holds input
(32 / b) i + j of output o in bits b j to b j + b - 1 of ``qweight[i, o]``; ``qzeros`` int32 ``[groups, out * b /
32]`` holds output (32 / b) i + j's zero point likewise in ``qzeros[g, i]``, minus one ("gptq_v2" stores it as it
is); ``scales`` float16 ``[groups, out]``; ``g_idx`` int32 ``[in]``, each input's group, which act-order
(``desc_act``) permutes. AWQ (``version`` "gemm"): ``qweight`` int32 ``[in, out / 8]`` holds output 8i + ORDER[j]
of input k in bits 4j to 4j + 3 of ``qweight[k, i]``, ``qzeros`` int32 ``[groups, out / 8]`` the zero points
likewise, ``scales`` float16 ``[groups, out]``. In both, weight = (level - zero) * scale.
FP8 (``quant_method`` "fp8"): ``weight`` float8_e4m3fn with ``weight_scale_inv`` ``[out / b, in / b]`` per block
(``weight_block_size`` [b, b]; inputs dynamic per group of b, as DeepSeek and transformers write it), or a
per-tensor ``weight_scale`` and, with ``activation_scheme`` "static", ``input_scale`` (weight = fp8 * scale).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from kvserve.core.quantization import compressed_tensors, fp8, grouped
from kvserve.plugins.interfaces import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble j of a packed word holds output AWQ_ORDER[j] of its 8
PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}
REQUIRED = ("qweight", "qzeros", "scales")
# method -> (the config key naming its packing, the values kvserve reads, its default first)
PACKINGS = {"gptq": ("checkpoint_format", ("gptq", "gptq_v2")), "awq": ("version", ("gemm",)),
            "auto-round": ("packing_format", ("auto_round:auto_gptq", "auto_round:auto_awq"))}
CHECKPOINT_ONLY = (*PACKINGS, "compressed-tensors")   # methods that only read a checkpoint ("fp8" is online too)
METHODS = (*CHECKPOINT_ONLY, "fp8")


def method_of(config) -> str | None:
    """The checkpoint's quantization method ("gptq", "awq", "auto-round", "compressed-tensors", "fp8"), or None if
    it has no quantization_config; a method or a variant kvserve does not read is a clear error."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    method = quantization.get("quant_method")
    if method not in METHODS:
        raise ValueError(f"checkpoint quantization method {method!r} is not supported; supported: "
                         f"{', '.join(map(repr, METHODS))}")
    if method == "compressed-tensors":
        compressed_tensors.config_groups(quantization)
        return method
    if method == "fp8":
        fp8_layout(quantization)
        return method
    packing, _ = layout_of(quantization)
    allowed_bits = (4, 8) if packing == "gptq" else (4,)
    if quantization.get("bits", 4) not in allowed_bits:
        raise ValueError(f"{method} checkpoints of {quantization['bits']} bits are not supported; supported: "
                         f"{', '.join(map(str, allowed_bits))}")
    if quantization.get("data_type", "int") != "int":
        raise ValueError(f"{method} checkpoints with data_type={quantization['data_type']!r} are not supported; "
                         f"supported: 'int'")
    return method


def layout_of(quantization: dict) -> tuple[str, bool]:
    """("gptq", whether zero points are stored minus one) or ("awq", False): how the layers are packed."""
    method = quantization["quant_method"]
    key, allowed = PACKINGS[method]
    value = str(quantization.get(key, allowed[0])).lower()
    if value not in allowed:
        raise ValueError(f"{method} checkpoints with {key}={value!r} are not supported; supported: "
                         f"{', '.join(map(repr, allowed))}")
    if method == "auto-round":   # its GPTQ packing stores zero points minus one, as GPTQ's own format does
        return ("awq", False) if "awq" in value else ("gptq", True)
    return (method, value == "gptq")


def gptq_weight(parts: dict[str, torch.Tensor], bits: int, group_size: int, zeros_minus_one: bool) -> QuantizedWeight:
    qweight = grouped.unpack_fields(parts["qweight"].T, bits).reshape(parts["qweight"].shape[1], -1)   # [out, in]
    out_features, in_features = qweight.shape
    zero = grouped.unpack_fields(parts["qzeros"], bits).reshape(parts["qzeros"].shape[0], -1)[:, :out_features].T
    tensors = {"qweight": qweight, "scale": parts["scales"].T.half().contiguous(),
               "zero": (zero.int() + 1 if zeros_minus_one else zero.int()).contiguous()}
    g_idx = parts.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features) // group_size):
        tensors["g_idx"] = g_idx.int()
    return QuantizedWeight(grouped.SCHEME_OF_BITS[bits], tensors, (out_features, in_features), group_size)


def awq_weight(parts: dict[str, torch.Tensor], group_size: int) -> QuantizedWeight:
    order = torch.argsort(torch.tensor(AWQ_ORDER))   # position of output j among a word's nibbles

    def outputs_last(packed: torch.Tensor) -> torch.Tensor:
        return grouped.unpack_fields(packed, 4)[..., order].reshape(packed.shape[0], -1)

    qweight = outputs_last(parts["qweight"]).T.contiguous()   # [out, in]
    out_features, in_features = qweight.shape
    tensors = {"qweight": qweight, "scale": parts["scales"].T.half().contiguous(),
               "zero": outputs_last(parts["qzeros"])[:, :out_features].T.contiguous()}
    return QuantizedWeight(grouped.W4A16, tensors, (out_features, in_features), group_size)


def gather_layers(weights: Iterable[tuple[str, torch.Tensor]], method: str,
                  parts_of: Callable[[str, str, torch.Tensor], tuple[tuple[str, ...], tuple[str, ...]] | None],
                  build: Callable[[str, dict[str, torch.Tensor]], QuantizedWeight]
                  ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """The tensors, each quantized layer's parts joined by ``build`` into one QuantizedWeight named
    ``<layer>.weight`` once all of them have been read. ``parts_of(layer, part, tensor)`` is None for a tensor that
    is not such a part, else (the layer's parts, those it cannot lack)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    required: dict[str, tuple[str, ...]] = {}
    for name, tensor in weights:
        layer, _, part = name.rpartition(".")
        expected = parts_of(layer, part, tensor)
        if expected is None:
            yield name, tensor
            continue
        parts = pending.setdefault(layer, {})
        parts[part] = tensor
        required[layer] = expected[1]
        if set(parts) == set(expected[0]):
            del pending[layer]
            yield f"{layer}.weight", build(layer, parts)
    for layer, parts in pending.items():   # optional parts never written (AutoAWQ's g_idx, GPTQ's may lack it)
        missing = [part for part in required[layer] if part not in parts]
        if missing:
            raise ValueError(f"{method} layer {layer!r} lacks {', '.join(missing)}")
        yield f"{layer}.weight", build(layer, parts)


def read_quantized(weights: Iterable[tuple[str, torch.Tensor]], config
                   ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """The checkpoint's tensors, each quantized layer's parts joined into one QuantizedWeight named
    ``<layer>.weight``."""
    method, quantization = method_of(config), config.quantization_config
    if method == "compressed-tensors":
        yield from gather_layers(weights, method, *compressed_tensors.reader(quantization))
        return
    if method == "fp8":
        yield from gather_layers(weights, method, *fp8_reader(quantization))
        return
    packing, zeros_minus_one = layout_of(quantization)
    bits = quantization.get("bits", 4)

    def build(layer: str, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        in_features = parts["qweight"].shape[0] * (32 // bits if packing == "gptq" else 1)
        group_size = quantization.get("group_size", 128)
        group_size = in_features if group_size in (-1, None) else group_size
        if packing == "gptq":
            return gptq_weight(parts, bits, group_size, zeros_minus_one)
        return awq_weight(parts, group_size)

    expected = (PARTS[packing], REQUIRED)
    yield from gather_layers(weights, method, lambda layer, part, tensor: expected if part in expected[0] else None,
                             build)


def fp8_layout(quantization: dict) -> tuple[int | None, bool]:
    """(the weight blocks' size, or None for per-tensor scales; whether inputs have static scales) of an fp8
    checkpoint, or a clear error."""
    allowed = ("dynamic", "static")
    scheme = quantization.get("activation_scheme", "dynamic")
    if scheme not in allowed:
        raise ValueError(f"fp8 checkpoints with activation_scheme={scheme!r} are not supported; supported: "
                         f"{', '.join(map(repr, allowed))}")
    if quantization.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"fp8 checkpoints with fmt={quantization['fmt']!r} are not supported; supported: 'e4m3'")
    block = quantization.get("weight_block_size")
    if block is not None and (len(block) != 2 or block[0] != block[1] or scheme != "dynamic"):
        raise ValueError(f"fp8 checkpoints with weight_block_size={block} and activation_scheme={scheme!r} are not "
                         f"supported; supported: square blocks with dynamic activations")
    return (block[0] if block else None), scheme == "static"


def fp8_reader(quantization: dict):
    """(parts_of, build) of an fp8 checkpoint's layers for ``gather_layers``."""
    block, static = fp8_layout(quantization)
    parts = ("weight", "weight_scale_inv") if block else ("weight", "weight_scale") + (("input_scale",) if static
                                                                                      else ())

    def parts_of(layer: str, part: str, tensor: torch.Tensor):
        fp8_weight = part == "weight" and tensor.dtype == torch.float8_e4m3fn
        return (parts, parts) if fp8_weight or (part in parts and part != "weight") else None

    def build(layer: str, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        scale = tensors["weight_scale_inv"] if block else tensors["weight_scale"]
        return fp8.stored_weight(tensors["weight"], scale, block, tensors.get("input_scale"))

    return parts_of, build
