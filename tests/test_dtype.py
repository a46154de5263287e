"""dtype="auto" follows the checkpoint where the platform supports it; explicit dtypes run."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def bf16_model(tiny_model, tmp_path_factory) -> str:
    source = tiny_model("qwen2")
    path = tmp_path_factory.mktemp("qwen2-bf16")
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{source}/{name}", path)
    return str(path)


@pytest.mark.parametrize("model, dtype, expected", [
    ("float32", "auto", torch.float32),
    ("bfloat16", "auto", torch.bfloat16),
    ("bfloat16", "float32", torch.float32),
    ("float32", "float16", torch.float16),
])
def test_dtype_choice_and_generation(tiny_model, bf16_model, model, dtype, expected):
    path = bf16_model if model == "bfloat16" else tiny_model("qwen2")
    llm = LLM(path, dtype=dtype, kv_cache_memory="8MiB")
    runner = llm.llm_engine.runner
    assert runner.dtype == expected and runner.kv_cache.dtype == expected
    assert all(p.dtype == expected for p in runner.model.parameters())
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_bfloat16_tracks_transformers(bf16_model):
    # bfloat16 runs the platform's fast paths (on CPU: fused ops, in-place decode attention, prepacked
    # linears, here with q/k/v biases); its logprobs stay within bfloat16 rounding of transformers'.
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    llm = LLM(bf16_model, kv_cache_memory="8MiB")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0,
                                                logprobs=0), use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.bfloat16)
    ids = prompt + list(out.outputs[0].token_ids)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    ours = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
    ours += [entry[token].logprob for entry, token in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
    reference = [expected[i - 1, token].item() for i, token in enumerate(ids) if i > 0][:len(ours)]
    assert ours == pytest.approx(reference, abs=0.15)   # a wrong kernel is off by whole units
