"""Online W4A16 int4 quantization (quantization="int4"): weights round to the nearest step of their group, the
engine computes what a transformers model with the same dequantized weights computes, and SmolLM2 (a Q4_1 GGUF,
whose blocks are groups of 32 on 16 levels) comes back with the perplexity of its own weights."""
from __future__ import annotations

import pytest
import torch

from kvserve import LLM
from kvserve.core.quantization.int4 import dequantize, quantize_weight
from quant_cases import assert_logprobs_match_transformers, smollm2_perplexity


@pytest.mark.parametrize("group_size", [32, 128])
def test_weights_round_to_the_nearest_step_of_their_group(group_size):
    torch.manual_seed(group_size)
    weight = torch.randn(24, 200) * torch.linspace(0.01, 3, 24)[:, None]   # 200 inputs: a shorter last group
    quantized = quantize_weight(weight, group_size)
    qweight, scale, offset = (quantized.tensors[name] for name in ("qweight", "scale", "offset"))
    groups = -(-200 // group_size)
    assert quantized.scheme == "w4a16_int4" and quantized.shape == (24, 200) and quantized.group_size == group_size
    assert qweight.dtype == torch.uint8 and scale.shape == offset.shape == (24, groups)
    step = scale.repeat_interleave(group_size, dim=1)[:, :200]
    assert ((dequantize(quantized, torch.float32) - weight).abs() <= step / 2 + 1e-6).all()
    # Each group spans its own range: its smallest weight is level 0 and its largest level 15.
    for g in range(groups):
        levels = qweight[:, g * group_size:(g + 1) * group_size]
        assert levels.amin(dim=1).tolist() == [0] * 24 and levels.amax(dim=1).tolist() == [15] * 24


def test_sixteen_level_groups_are_kept_exactly():
    # Weights that already sit on 16 levels of their group (as a GGUF Q4_1 model's do) come back unchanged.
    torch.manual_seed(0)
    levels, scale, low = torch.randint(0, 16, (8, 64)), torch.rand(8, 2) + 0.1, torch.randn(8, 2)
    levels[:, 0], levels[:, 32], levels[:, 1], levels[:, 33] = 0, 0, 15, 15
    weight = levels * scale.repeat_interleave(32, dim=1) + low.repeat_interleave(32, dim=1)
    assert torch.allclose(dequantize(quantize_weight(weight, 32), torch.float32), weight, atol=1e-6)


def dequantized(hf: torch.nn.Module) -> torch.nn.Module:
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            module.weight.data = dequantize(quantize_weight(module.weight), torch.float32)
    return hf


@pytest.mark.parametrize("architecture", ["llama-tied-gqa", "qwen2"])   # tied head; q/k/v biases
def test_int4_logprobs_equal_transformers_on_the_dequantized_weights(tiny_model, architecture):
    assert_logprobs_match_transformers(tiny_model(architecture), "int4", dequantized)


def test_smollm2_int4_perplexity_is_within_a_few_percent_of_float32(smollm2_path):
    reference, quantized = smollm2_perplexity(smollm2_path, None), smollm2_perplexity(smollm2_path, "int4")
    assert 5 < reference < 30   # the model reads English
    assert quantized == pytest.approx(reference, rel=0.02)


def test_a_scheme_without_a_platform_kernel_warns_once_at_load(tiny_model, caplog):
    with caplog.at_level("WARNING", logger="kvserve"):
        LLM(tiny_model("qwen2"), dtype="float32", quantization="int4", kv_cache_memory="8MiB")
    warnings = [r.getMessage() for r in caplog.records if "portable reference" in r.getMessage()]
    assert warnings == ["quantization 'int4' runs on the portable reference on platform 'cpu' (no kernel for "
                        "w4a16_int4): slower than the unquantized model"]
