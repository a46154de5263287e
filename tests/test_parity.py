"""Greedy outputs token-identical to Hugging Face transformers' generate, in float32."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ARCHITECTURES
from kvserve import LLM, SamplingParams
from kvserve.conformance.tiny_model import hf_greedy

pytestmark = pytest.mark.slow

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Continuous batching lets new requests join while others decode.",
    "Once",
    "déjà vu, naïve café, 東京",
    "Paged attention stores keys and values in blocks.",
]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tiny_models_match_transformers(tiny_model, arch):
    path = tiny_model(arch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    expected = hf_greedy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), prompts, 40)

    # A small token budget makes the long prompt prefill in chunks next to the others' decodes.
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=16, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)


def test_smollm2_gguf_matches_transformers(smollm2_path):
    folder, name = os.path.split(smollm2_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    llm = LLM(max_model_len=1024, kv_cache_memory="128MiB", dtype="float32")
    conversations = [[{"role": "user", "content": q}] for q in
                     ("What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.")]
    prompts = [llm.apply_chat_template(c) for c in conversations]
    prompts.append(llm.get_tokenizer()("Once upon a time, in a small village,")["input_ids"])
    expected = hf_greedy(hf, prompts, 32)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    text = llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0].text
    assert "Paris" in text
