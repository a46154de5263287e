"""Online quantization (``quantization="int8"`` or ``"int4"``): each linear layer but the output head is quantized
once its float weights are loaded, and runs on the platform's kernel for the scheme or on the portable reference."""
from __future__ import annotations

import torch

from kvserve.core.layers.linear import KernelFactory, LinearKernel
from kvserve.core.log import logger
from kvserve.core.quantization import int4, int8
from kvserve.plugins.manager import Platform

SCHEMES = {"int8": (int8.quantize_weight, int8.reference_kernel),
           "int4": (int4.quantize_weight, int4.reference_kernel)}
UNQUANTIZED = ("lm_head",)   # as in vLLM, the output head keeps the model dtype: logits are the most sensitive


def kernel_factory(quantization: str | None, platform: Platform) -> KernelFactory:
    """make(layer name, loaded weight) -> the layer's kernel, or None to keep torch's linear."""
    if quantization not in SCHEMES:
        return lambda name, weight: platform.linear_kernel(weight)
    quantize, reference = SCHEMES[quantization]
    warned = False

    def make(name: str, weight: torch.Tensor) -> LinearKernel | None:
        nonlocal warned
        if name.rsplit(".", 1)[-1] in UNQUANTIZED:
            return platform.linear_kernel(weight)
        quantized = quantize(weight)
        kernel = platform.quant_kernel(quantized)
        if kernel is not None:
            return kernel
        if not warned:
            warned = True
            logger.warning("quantization %r runs on the portable reference on platform %r (no kernel for %s): "
                           "slower than the unquantized model", quantization, platform.name, quantized.scheme)
        return reference(quantized)

    return make


def gate_up_kernel_factory(quantization: str | None, platform: Platform) -> KernelFactory:
    """make(layer name, loaded weight) -> a gate-up layer's kernel fused with its activation, or None; quantized
    layers keep the scheme's matmul."""
    if quantization in SCHEMES:
        return lambda name, weight: None
    return lambda name, weight: platform.gate_up_kernel(weight)
