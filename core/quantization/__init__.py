"""Quantization schemes: how a layer's weight is quantized and described (``QuantizedWeight``), and the portable
reference matmul every platform gets. Kernels come from the platform (``platform_quant_kernel``)."""
import torch

from kvserve.core.quantization import fp8, grouped, int8
from kvserve.plugins.interfaces import QuantizedWeight

# --quantization values; a GPTQ, AWQ, AutoRound, compressed-tensors or fp8 checkpoint's own comes from its
# quantization_config.
METHODS = {
    "auto-round": "AutoRound checkpoints (its auto_round format in GPTQ or AWQ packing), read from its "
                  "quantization_config",
    "awq": "AWQ checkpoints (AutoAWQ's 4-bit GEMM packing), read from the checkpoint's quantization_config",
    "compressed-tensors": "compressed-tensors checkpoints as llm-compressor writes them (W4A16 and W8A16 "
                          "pack-quantized, W8A8 int8, FP8), read from the checkpoint's quantization_config",
    "fp8": "FP8 (e4m3) W8A8: an fp8 checkpoint's own (quant_method fp8), else online, weights per channel at load "
           "and activations per token at run time",
    "gguf": "a GGUF file's Q4_0, Q4_1, Q8_0, Q5_0, Q5_1 and IQ4_NL linear layers and output head run as int4 / int8 "
            "weight-only weights, as stored (K-quants and other types dequantized)",
    "gptq": "GPTQ checkpoints (4 or 8 bits, as AutoGPTQ and GPTQModel write them), read from its quantization_config",
    "int4": "online W4A16: weights quantized at load in groups of 32 inputs (or --quantization-group-size), 16 "
            "levels each, activations unquantized",
    "int8": "online W8A8: weights quantized per channel at load, activations per token at run time",
}

PER_INPUT = ("g_idx", "input_scale")   # tensors that describe a layer's inputs, not its outputs


def join_shards(parts: list[QuantizedWeight], shape: tuple[int, int]) -> QuantizedWeight | None:
    """One QuantizedWeight of ``shape`` for the shards ``parts`` (in row order) of a merged layer, or None when they
    are not alike: another scheme, group size or set of tensors, or different per-input tensors (GPTQ's act-order
    g_idx, which shards sharing an input share; a static FP8 input scale)."""
    first = parts[0]
    kind = (first.scheme, first.group_size, first.tensors.keys())
    for part in parts[1:]:
        if (part.scheme, part.group_size, part.tensors.keys()) != kind:
            return None
        if any(not torch.equal(part.tensors[key], first.tensors[key]) for key in PER_INPUT if key in first.tensors):
            return None
    tensors = {key: first.tensors[key] if key in PER_INPUT else torch.cat([part.tensors[key] for part in parts])
               for key in first.tensors}
    return QuantizedWeight(first.scheme, tensors, shape, first.group_size)


DEQUANTIZERS = {int8.SCHEME: int8.dequantize, grouped.W4A16: grouped.dequantize, grouped.W8A16: grouped.dequantize,
                fp8.SCHEME: fp8.dequantize, fp8.WEIGHT_ONLY: fp8.dequantize}


def dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The float weight [out, in] that ``weight`` stands for."""
    return DEQUANTIZERS[weight.scheme](weight, dtype)
