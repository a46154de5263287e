"""The linear layers' kernels under a quantization method: online quantization (``quantization="int8"``,
``"int4"`` or ``"fp8"`` of an unquantized checkpoint) quantizes each linear layer but the output head once its float
weights are loaded; a checkpoint's own quantized weights (``"gguf"``, GPTQ, AWQ, AutoRound, compressed-tensors,
fp8) arrive quantized, and its float layers stay float. Either runs on the platform's kernel for its scheme, or on
the portable reference."""
from __future__ import annotations

import dataclasses

import torch

from kvserve.core.layers.linear import KernelFactory, LinearKernel
from kvserve.core.log import logger
from kvserve.core.quantization import fp8, grouped, int4, int8
from kvserve.plugins.interfaces import QuantizedWeight
from kvserve.plugins.manager import Platform

QUANTIZERS = {"int8": int8.quantize_weight, "int4": int4.quantize_weight, "fp8": fp8.quantize_weight}
REFERENCES = {int8.SCHEME: int8.reference_kernel, grouped.W4A16: grouped.reference_kernel,
              grouped.W8A16: grouped.reference_kernel, fp8.SCHEME: fp8.reference_kernel,
              fp8.WEIGHT_ONLY: fp8.reference_kernel}
UNQUANTIZED = ("lm_head",)   # as in vLLM, the output head keeps the model dtype: logits are the most sensitive


def kernel_factory(quantization: str | None, platform: Platform, dtype: torch.dtype, online: bool,
                   group_size: int | None = None) -> KernelFactory:
    """make(layer name, loaded float or quantized weight) -> the layer's kernel, or None to keep torch's linear;
    ``dtype`` is the model's; ``online``: float layers are to be quantized (not a quantized checkpoint's), int4's
    in groups of ``group_size`` inputs (None: its default)."""
    options = {} if group_size is None else {"group_size": group_size}
    warned = False

    def quant_kernel(quantized: QuantizedWeight) -> LinearKernel:
        nonlocal warned
        kernel = platform.quant_kernel(quantized)
        if kernel is not None:
            return kernel
        if not warned:
            warned = True
            logger.warning("quantization %r runs on the portable reference on platform %r (no kernel for %s): "
                           "slower than the unquantized model", quantization, platform.name, quantized.scheme)
        return REFERENCES[quantized.scheme](quantized)

    def make(name: str, weight: torch.Tensor | QuantizedWeight) -> LinearKernel | None:
        if isinstance(weight, QuantizedWeight):
            return quant_kernel(dataclasses.replace(weight, dtype=dtype))
        if not online or quantization not in QUANTIZERS or name.rsplit(".", 1)[-1] in UNQUANTIZED:
            return platform.linear_kernel(weight)
        return quant_kernel(QUANTIZERS[quantization](weight, **options))

    return make


def gate_up_kernel_factory(quantization: str | None, platform: Platform, online: bool) -> KernelFactory:
    """make(layer name, loaded float weight) -> a gate-up layer's kernel fused with its activation, or None; layers
    to be quantized online keep the scheme's matmul."""
    if online and quantization in QUANTIZERS:
        return lambda name, weight: None
    return lambda name, weight: platform.gate_up_kernel(weight)
