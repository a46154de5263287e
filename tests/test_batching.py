"""Continuous batching must not change results, and must free every block it hands out."""
from __future__ import annotations

import random

import pytest

from kvserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model):
    # 24 batched tokens: long prompts prefill in chunks beside other sequences' decodes.
    return LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="8MiB",
               max_num_batched_tokens=24, max_num_seqs=6)


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(rng.randrange(1, 60))] for _ in range(count)]


def run_staggered(llm: LLM, prompts, params) -> tuple[list[list[int]], list[str]]:
    """Add one request every other step; returns each request's tokens and the admission order."""
    engine = llm.llm_engine
    results, admitted, pending = {}, [], list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params[i])
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output.outputs[0].token_ids
        admitted += [s.request_id for s in engine.scheduler.running if s.request_id not in admitted]
        tables = [b for s in engine.scheduler.running for b in s.block_table]
        assert len(tables) == len(set(tables)), "a block is held by two sequences"
        step += 1
    return [results[f"r{i}"] for i in range(len(prompts))], admitted


def test_greedy_tokens_same_alone_and_together(llm):
    prompts = make_prompts(10)
    params = [SamplingParams(temperature=0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    together, _ = run_staggered(llm, prompts, params)
    assert together == alone
    assert [len(t) for t in together] == [sp.max_tokens for sp in params]


def test_seeded_sampling_same_alone_and_together(llm):
    prompts = make_prompts(6, seed=1)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=12, ignore_eos=True)
              for i in range(len(prompts))]
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    together, _ = run_staggered(llm, prompts, params)
    assert together == alone


def test_all_blocks_free_after_mixed_requests(llm):
    engine = llm.llm_engine
    manager = engine.block_manager
    prompts = make_prompts(12, seed=2)
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, max_tokens=1 + i, stop_token_ids=[5, 6])
              for i in range(len(prompts))]
    run_staggered(llm, prompts, params)
    assert manager.num_free_blocks == manager.num_blocks
    assert sorted(manager.free_blocks) == list(range(manager.num_blocks))
    assert not any(manager.ref_counts)
    assert not engine.requests and not engine.runner.sampler.generators


def test_more_requests_than_kv_capacity(tiny_model):
    # 8 blocks of 16 tokens and requests of up to 64 tokens: sequences are preempted and recomputed.
    llm = LLM(tiny_model("llama-tied-gqa"), dtype="float32", num_gpu_blocks_override=8, max_model_len=128,
              max_num_batched_tokens=32, max_num_seqs=8)
    prompts = make_prompts(7, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=64 - len(p), ignore_eos=True) for p in prompts]
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    engine = llm.llm_engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    results, admitted = {}, []
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output.outputs[0].token_ids
        admitted += [s.request_id for s in engine.scheduler.running if s.request_id not in admitted]
    assert [results[f"r{i}"] for i in range(len(prompts))] == alone
    assert admitted == [f"r{i}" for i in range(len(prompts))]
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == 8
