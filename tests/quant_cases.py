"""What the quantization schemes' tests share: logprobs against transformers given a scheme's arithmetic, and
SmolLM2's perplexity on a fixed English text."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from kvserve import LLM, SamplingParams

TEXT = Path(__file__).with_name("data") / "english.txt"


def assert_logprobs_match_transformers(path: str, quantization: str, fake: Callable[[nn.Module], nn.Module]) -> None:
    """The engine's prompt and sampled logprobs under ``quantization`` equal float32 transformers' after ``fake``
    gave it the scheme's arithmetic."""
    prompt = [5, 17, 301, 44, 9, 250, 3, 88, 120, 7, 61, 372]
    llm = LLM(path, dtype="float32", quantization=quantization, kv_cache_memory="8MiB")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0,
                                                logprobs=0), use_tqdm=False)[0]
    ids = prompt + list(out.outputs[0].token_ids)
    hf = fake(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
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


@functools.cache
def smollm2_perplexity(path: str, quantization: str | None) -> float:
    """SmolLM2's perplexity on TEXT in float32 (no quantization) or under ``quantization``."""
    dtype = "float32" if quantization is None else "auto"
    llm = LLM(path, dtype=dtype, quantization=quantization, kv_cache_memory="64MiB", max_model_len=1024)
    return perplexity(llm, TEXT.read_text())
