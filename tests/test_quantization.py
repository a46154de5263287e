"""Online W8A8 int8 quantization (quantization="int8"): the engine computes what a float32 transformers model with
the same dequantized weights and per-token quantized activations computes, and SmolLM2 keeps its perplexity."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvserve import LLM, SamplingParams
from kvserve.core.quantization.int8 import quantize_tokens, quantize_weight

TEXT = Path(__file__).with_name("data") / "english.txt"


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
    path = tiny_model(architecture)
    prompt = [5, 17, 301, 44, 9, 250, 3, 88, 120, 7, 61, 372]
    llm = LLM(path, dtype="float32", quantization="int8", kv_cache_memory="8MiB")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0,
                                                logprobs=0), use_tqdm=False)[0]
    ids = prompt + list(out.outputs[0].token_ids)
    hf = fake_quantized(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    ours = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
    ours += [entry[token].logprob for entry, token in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
    assert ours == pytest.approx([expected[i - 1, token].item() for i, token in enumerate(ids) if i > 0], abs=1e-3)


def perplexity(llm: LLM, text: str) -> float:
    ids = llm.get_tokenizer().encode(text)
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    logprobs = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:])]
    return math.exp(-sum(logprobs) / len(logprobs))


def test_smollm2_int8_perplexity_is_within_a_few_percent_of_float32(smollm2_path):
    text = TEXT.read_text()
    reference = perplexity(LLM(smollm2_path, dtype="float32", kv_cache_memory="64MiB", max_model_len=1024), text)
    quantized = perplexity(LLM(smollm2_path, quantization="int8", kv_cache_memory="64MiB", max_model_len=1024), text)
    assert 5 < reference < 30   # the model reads English
    assert quantized == pytest.approx(reference, rel=0.05)
