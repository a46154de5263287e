"""Quantization schemes: how a layer's weight is quantized and described (``QuantizedWeight``), and the portable
reference matmul every platform gets. Kernels come from the platform (``platform_quant_kernel``)."""

# --quantization values; checkpoints that carry a quantization_config will add theirs.
METHODS = {
    "gguf": "a GGUF file's Q4_0 and Q4_1 linear layers run as int4 weights, as stored (other types dequantized)",
    "int4": "online W4A16: weights quantized at load in groups of 32 inputs (16 levels each), activations unquantized",
    "int8": "online W8A8: weights quantized per channel at load, activations per token at run time",
}
