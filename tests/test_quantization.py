"""Online quantization (quantization="int8", "int4" or "fp8") and a GGUF file's own blocks ("gguf"): the engine
computes what a float32 transformers model given the scheme's arithmetic computes, SmolLM2 keeps its perplexity,
and a scheme without a platform kernel is named at load. The int8 and fp8 quantizers' rounding is here; int4's is
in test_quantization_int4.py."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import quant_packers

from kvserve import LLM, SamplingParams
from kvserve.core.quantization import dequantize, fp8, int4, int8
from kvserve.core.loader.gguf import iter_gguf_weights
from kvserve.kernels_cpu import native
from kvserve.plugins.interfaces import QuantizedWeight

TEXT = Path(__file__).with_name("data") / "english.txt"


def perplexity(llm: LLM, text: str) -> float:
    ids = llm.get_tokenizer().encode(text)
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    logprobs = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:])]
    return math.exp(-sum(logprobs) / len(logprobs))


@functools.cache
def smollm2_perplexity(path: str, quantization: str | None) -> float:
    """SmolLM2's perplexity on TEXT in float32 (no quantization) or under ``quantization``."""
    dtype = "float32" if quantization is None else "auto"
    llm = LLM(path, dtype=dtype, quantization=quantization, kv_cache_memory="64MiB", max_model_len=1024)
    return perplexity(llm, TEXT.read_text())


def test_weights_round_to_the_nearest_step_of_their_channel():
    weight = torch.randn(24, 40) * torch.linspace(0.01, 3, 24)[:, None]
    quantized = int8.quantize_weight(weight)
    qweight, scale = quantized.tensors["qweight"], quantized.tensors["scale"]
    assert quantized.scheme == "w8a8_int8" and quantized.shape == (24, 40) and qweight.dtype == torch.int8
    assert qweight.abs().amax(dim=1).tolist() == [127] * 24   # each channel's largest weight uses the full range
    error = (qweight.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


def test_fp8_weights_take_their_channels_scale():
    torch.manual_seed(0)
    weight = torch.randn(24, 40) * torch.linspace(0.01, 3, 24)[:, None]
    quantized = fp8.quantize_weight(weight)
    stored, scale = quantized.tensors["weight"], quantized.tensors["scale"]
    assert quantized.scheme == "w8a8_fp8" and stored.dtype == torch.float8_e4m3fn and scale.shape == (24,)
    assert stored.float().abs().amax(dim=1).tolist() == [448.0] * 24   # each channel's largest weight at e4m3's max
    relative = (dequantize(quantized, torch.float32) - weight).abs() / weight.abs()
    normal = weight.abs() >= scale[:, None] * 2 ** -6   # e4m3's smallest normal number, 2^-6
    assert relative[normal].max() <= 2 ** -4   # 3 mantissa bits: half a step is at most 1/16 of a normal number


def rounded_to_int8_steps(module, args):
    q, scale = int8.quantize_tokens(args[0])
    return (q * scale,)


def fake_int8(hf: torch.nn.Module) -> torch.nn.Module:
    """The W8A8 arithmetic in float32: dequantized weights, and inputs rounded to their row's int8 steps."""
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            quantized = int8.quantize_weight(module.weight)
            module.weight.data = quantized.tensors["qweight"].float() * quantized.tensors["scale"][:, None]
            module.register_forward_pre_hook(rounded_to_int8_steps)
    return hf


def fake_int4(hf: torch.nn.Module, group_size: int = int4.GROUP_SIZE) -> torch.nn.Module:
    """The W4A16 arithmetic in float32: dequantized weights, inputs as they are."""
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            module.weight.data = dequantize(int4.quantize_weight(module.weight, group_size), torch.float32)
    return hf


def fake_fp8(hf: torch.nn.Module) -> torch.nn.Module:
    """The online FP8 arithmetic in float32: dequantized weights, inputs rounded to their row's e4m3 steps."""
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            quantized = fp8.quantize_weight(module.weight)
            module.weight.data = dequantize(quantized, torch.float32)
            module.register_forward_pre_hook(lambda m, args, q=quantized: (fp8.fake_quantize_inputs(q, args[0]),))
    return hf


FAKES = {"int8": fake_int8, "int4": fake_int4, "fp8": fake_fp8, "int4-g16": functools.partial(fake_int4, group_size=16),
         "int4-g128": functools.partial(fake_int4, group_size=128)}


def fake_checkpoint(hf: torch.nn.Module, path: str, name: str) -> torch.nn.Module:
    """The float32 weights a GPTQ or AWQ checkpoint written by quant_packers stands for."""
    for layer, (levels, zero, scale, g_idx) in quant_packers.quantized_layers(path, name).items():
        hf.get_submodule(layer).weight.data = quant_packers.dequantized(levels, zero, scale, g_idx)
    return hf


@pytest.mark.parametrize("quantization", ["int8", "int4", "int4-g16", "int4-g128", "fp8", *quant_packers.FORMATS])
@pytest.mark.parametrize("architecture", ["llama-tied-gqa", "qwen2"])   # tied head; q/k/v biases
def test_logprobs_equal_transformers_given_the_schemes_arithmetic(tiny_model, tmp_path, architecture, quantization):
    path = tiny_model(architecture)
    prompt = [5, 17, 301, 44, 9, 250, 3, 88, 120, 7, 61, 372]
    if quantization in quant_packers.FORMATS:   # a checkpoint in the format: its quantization_config says so
        llm = LLM(quant_packers.write_checkpoint(path, quantization, tmp_path / quantization), dtype="float32",
                  kv_cache_memory="8MiB")
        hf = fake_checkpoint(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), path,
                             quantization)
    else:   # "int4-g16": online int4 in groups of 16 inputs
        method, _, group = quantization.partition("-g")
        llm = LLM(path, dtype="float32", quantization=method, kv_cache_memory="8MiB",
                  quantization_group_size=int(group) if group else None)
        hf = FAKES[quantization](AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0,
                                                logprobs=0), use_tqdm=False)[0]
    ids = prompt + list(out.outputs[0].token_ids)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    ours = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
    ours += [entry[token].logprob for entry, token in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
    assert ours == pytest.approx([expected[i - 1, token].item() for i, token in enumerate(ids) if i > 0], abs=1e-3)


# int4's groups of 32 on 16 levels recover SmolLM2's own weights, which are Q4_1 blocks of that shape; "gguf" runs
# those blocks as they are stored.
@pytest.mark.parametrize("quantization, tolerance", [("int8", 0.05), ("int4", 0.02), ("gguf", 0.02), ("fp8", 0.05)])
def test_smollm2_perplexity_is_within_a_few_percent_of_float32(smollm2_path, quantization, tolerance):
    reference, quantized = smollm2_perplexity(smollm2_path, None), smollm2_perplexity(smollm2_path, quantization)
    assert 5 < reference < 30   # the model reads English
    assert quantized == pytest.approx(reference, rel=tolerance)


def test_int4_recovers_smollm2s_q4_1_blocks_as_gguf_runs_them(smollm2_path):
    # SmolLM2's Q4_1 layers as "gguf" runs them (the file's blocks) and as online int4 quantizes their dequantized
    # floats: the same levels, scales and offsets, so the same weights on the same kernel.
    floats = dict(iter_gguf_weights(smollm2_path))
    blocks = [(name, weight) for name, weight in iter_gguf_weights(smollm2_path, quantized_blocks=True)
              if isinstance(weight, QuantizedWeight) and weight.scheme == int4.SCHEME]
    assert len(blocks) == 210   # 30 layers of q, k, v, o, gate, up, down
    for name, weight in blocks:
        recovered = int4.quantize_weight(floats[name])
        assert recovered.tensors.keys() == weight.tensors.keys()
        assert all(torch.equal(recovered.tensors[key], weight.tensors[key]) for key in weight.tensors), name


def test_gguf_quantization_needs_a_gguf_file(tiny_model):
    with pytest.raises(ValueError, match=r"quantization='gguf' runs a \.gguf file's quantized blocks.*allowed for "
                                         r"it: None, 'fp8', 'int4', 'int8'"):
        LLM(tiny_model("qwen2"), quantization="gguf", kv_cache_memory="8MiB")


def test_a_scheme_without_a_platform_kernel_warns_once_at_load(tiny_model, tmp_path, caplog):
    act_order = quant_packers.write_checkpoint(tiny_model("qwen2"), "gptq-desc-act", tmp_path / "gptq")
    eight_bits = quant_packers.write_checkpoint(tiny_model("qwen2"), "gptq-8bit-desc-act", tmp_path / "gptq8")

    def warnings(dtype: str, path: str = tiny_model("qwen2"), quantization: str | None = "int4") -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="kvserve"):
            LLM(path, dtype=dtype, quantization=quantization, kv_cache_memory="8MiB")
        return [r.getMessage() for r in caplog.records if "portable reference" in r.getMessage()]

    # The CPU platform's int4 / int8 weight-only kernel takes no float16 activations; bfloat16 (AVX512-BF16) or
    # float32 and bfloat16 (AVX2), with offsets or zero points, act-order too.
    assert warnings("float16") == ["quantization 'int4' runs on the portable reference on platform 'cpu' (no "
                                   "kernel for w4a16_int4): slower than the unquantized model"]
    assert len(warnings("float16", act_order, None)) == len(warnings("float16", eight_bits, None)) == 1
    for dtype in ("float32", "bfloat16"):
        if native.supported("grouped", dtype):
            assert warnings(dtype) == warnings(dtype, act_order, None) == warnings(dtype, eight_bits, None) == []
