"""Chunked prefill, prefix caching and preemption change how tokens are computed, never which ones."""
from __future__ import annotations

import random

import pytest

from kvserve import LLM, SamplingParams

SYSTEM = list(range(10, 90))    # a long shared prefix, as a system prompt would be


def prompts(seed: int, count: int = 8) -> list[list[int]]:
    rng = random.Random(seed)
    return [SYSTEM + [rng.randrange(3, 380) for _ in range(rng.randrange(1, 40))] for _ in range(count)]


def greedy(llm: LLM, batch: list[list[int]], max_tokens: int = 24) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]


VARIANTS = {
    "chunked": dict(enable_chunked_prefill=True, max_num_batched_tokens=24, max_num_seqs=8),
    "prefix-cached": dict(enable_prefix_caching=True),
    "preempted": dict(num_gpu_blocks_override=12, max_model_len=160, max_num_batched_tokens=160),
    "all": dict(enable_prefix_caching=True, num_gpu_blocks_override=12, max_model_len=160,
                max_num_batched_tokens=24, max_num_seqs=8),
}


@pytest.fixture(scope="module")
def baseline(tiny_model):
    llm = LLM(tiny_model("qwen2"), dtype="float32", kv_cache_memory="16MiB", max_model_len=160,
              enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=160)
    return {seed: greedy(llm, prompts(seed)) for seed in (0, 1)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_tokens_unchanged(tiny_model, baseline, variant):
    options = {"enable_prefix_caching": False, "kv_cache_memory": "16MiB", "max_model_len": 160, **VARIANTS[variant]}
    llm = LLM(tiny_model("qwen2"), dtype="float32", **options)
    engine = llm.llm_engine
    for seed in (0, 1):   # the second round finds the shared prefix cached (when caching is on)
        assert greedy(llm, prompts(seed)) == baseline[seed]
    blocks, scheduler = engine.block_manager, engine.scheduler
    if options["enable_prefix_caching"]:
        assert blocks.prefix_hits >= len(SYSTEM) // 16 * 16 * 8
    else:
        assert blocks.prefix_hits == 0 and not blocks.cached
    if "num_gpu_blocks_override" in options:
        assert scheduler.num_preemptions > 0
    assert blocks.num_free_blocks == blocks.num_blocks


def test_prefix_cache_saves_prefill_tokens(tiny_model):
    llm = LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="16MiB", max_model_len=160)
    engine = llm.llm_engine
    greedy(llm, prompts(0, count=1))
    before = engine.prompt_tokens_total
    batch = prompts(1)
    greedy(llm, batch, max_tokens=1)
    computed = engine.prompt_tokens_total - before
    shared = len(SYSTEM) // 16 * 16
    assert computed == sum(len(p) for p in batch) - shared * len(batch)


def test_smollm2_unchanged_by_chunking_caching_and_preemption(smollm2_path):
    conversations = [[{"role": "system", "content": "You are a concise assistant who answers in one sentence."},
                      {"role": "user", "content": question}]
                     for question in ("What is the capital of France?", "Name a prime number.", "What is 2+2?")]
    # float32: in bfloat16 a matmul's rounding depends on how many rows it has, so a different batching
    # legitimately changes results, as it does in vLLM.
    plain = LLM(max_model_len=256, kv_cache_memory="64MiB", enable_prefix_caching=False,
                enable_chunked_prefill=False, max_num_batched_tokens=256, dtype="float32")
    batch = [plain.apply_chat_template(c) for c in conversations]
    expected = greedy(plain, batch, max_tokens=32)
    del plain
    tight = LLM(max_model_len=128, num_gpu_blocks_override=8, max_num_batched_tokens=32, max_num_seqs=8,
                dtype="float32")
    assert greedy(tight, batch, max_tokens=32) == expected
    assert greedy(tight, batch, max_tokens=32) == expected
    assert tight.llm_engine.scheduler.num_preemptions > 0 and tight.llm_engine.block_manager.prefix_hits > 0
