"""Online W8A8 int8 quantization (quantization="int8"): the engine computes what a float32 transformers model with
the same dequantized weights and per-token quantized activations computes, and SmolLM2 keeps its perplexity."""
from __future__ import annotations

import pytest
import torch

from kvserve.core.quantization.int8 import quantize_tokens, quantize_weight
from quant_cases import assert_logprobs_match_transformers, smollm2_perplexity


def test_weights_round_to_the_nearest_step_of_their_channel():
    weight = torch.randn(24, 40) * torch.linspace(0.01, 3, 24)[:, None]
    quantized = quantize_weight(weight)
    qweight, scale = quantized.tensors["qweight"], quantized.tensors["scale"]
    assert quantized.scheme == "w8a8_int8" and quantized.shape == (24, 40) and qweight.dtype == torch.int8
    assert qweight.abs().amax(dim=1).tolist() == [127] * 24   # each channel's largest weight uses the full range
    error = (qweight.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


def rounded_to_int8_steps(module, args):
    q, scale = quantize_tokens(args[0])
    return (q * scale,)


def fake_quantized(hf: torch.nn.Module) -> torch.nn.Module:
    """The W8A8 arithmetic in float32: dequantized weights, and inputs rounded to their row's int8 steps."""
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            quantized = quantize_weight(module.weight)
            module.weight.data = quantized.tensors["qweight"].float() * quantized.tensors["scale"][:, None]
            module.register_forward_pre_hook(rounded_to_int8_steps)
    return hf


@pytest.mark.parametrize("architecture", ["llama-tied-gqa", "qwen2"])   # tied head; q/k/v biases
def test_int8_logprobs_equal_fake_quantized_transformers(tiny_model, architecture):
    assert_logprobs_match_transformers(tiny_model(architecture), "int8", fake_quantized)


def test_smollm2_int8_perplexity_is_within_a_few_percent_of_float32(smollm2_path):
    reference, quantized = smollm2_perplexity(smollm2_path, None), smollm2_perplexity(smollm2_path, "int8")
    assert 5 < reference < 30   # the model reads English
    assert quantized == pytest.approx(reference, rel=0.05)
