"""Parallel sampling (n, best_of): the prompt is computed once, its blocks are shared, and a shared partial
last block is copied when a child first writes to it."""
from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams

PROMPT = list(range(3, 43))     # 40 tokens: two full 16-token blocks and half of a third
SAMPLE = dict(temperature=1.0, max_tokens=12, ignore_eos=True)


def tiny_llm(tiny_model, **options) -> LLM:
    return LLM(tiny_model("llama-tied-gqa"), dtype="float32", **{"kv_cache_memory": "16MiB", "max_model_len": 160,
                                                                 **options})


def run(engine, request_id: str, prompt: list[int], params: SamplingParams) -> list:
    """Every output the engine gives for the request, step by step, until all requests are done."""
    engine.add_request(request_id, prompt, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def test_children_fork_the_prompt_blocks_and_copy_the_partial_one(tiny_model):
    engine = tiny_llm(tiny_model, enable_prefix_caching=False).llm_engine
    manager = engine.block_manager
    engine.add_request("fan", PROMPT, SamplingParams(n=4, seed=0, **SAMPLE))
    engine.step()                # the prompt, computed once; each child samples its first token from its logits
    assert engine.prompt_tokens_total == len(PROMPT)
    tables = [s.block_table for s in engine.scheduler.running]
    assert len(tables) == 4 and all(t == tables[0] for t in tables)
    assert [manager.ref_counts[b] for b in tables[0]] == [4, 4, 4]
    partial = tables[0][2]
    engine.step()                # each child writes its first token into the shared partial block: copy on write
    tables = [s.block_table for s in engine.scheduler.running]
    assert all(t[:2] == tables[0][:2] for t in tables) and [manager.ref_counts[b] for b in tables[0][:2]] == [4, 4]
    assert len({t[2] for t in tables}) == 4 and partial in {t[2] for t in tables}
    cache = engine.runner.kv_cache          # [layers, keys/values, kv heads, blocks, block_size, head_size]
    keys, values = cache[:, 0], cache[:, 1]
    if engine.runner.backend.name == "cpu-native":   # it stores each block's keys transposed, [head_size, block_size]
        keys = keys.reshape(*keys.shape[:3], keys.shape[4], keys.shape[3]).transpose(-1, -2)
    for table in tables:                    # the 8 prompt tokens' keys and values came along with each copy
        for part in (keys, values):
            assert torch.equal(part[:, :, table[2], :8], part[:, :, partial, :8])
    while engine.has_unfinished_requests():
        engine.step()
    assert manager.num_free_blocks == manager.num_blocks


@pytest.mark.parametrize("options", [dict(enable_prefix_caching=False),
                                     dict(num_gpu_blocks_override=6, max_model_len=96, max_num_batched_tokens=96,
                                          max_num_seqs=8)],
                         ids=["no-prefix-cache", "preempted"])
def test_children_equal_seeded_single_requests(tiny_model, options):
    roomy = tiny_llm(tiny_model)
    singles = [roomy.generate([PROMPT], SamplingParams(seed=7 + i, **{**SAMPLE, "max_tokens": 40}), use_tqdm=False)
               [0].outputs[0].token_ids for i in range(3)]
    llm = tiny_llm(tiny_model, **options)
    out = llm.generate([PROMPT], SamplingParams(n=3, seed=7, **{**SAMPLE, "max_tokens": 40}), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == singles
    assert len({tuple(s) for s in singles}) == 3
    engine = llm.llm_engine
    assert (engine.scheduler.num_preemptions > 0) == ("num_gpu_blocks_override" in options)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_forks_count_against_max_num_seqs(tiny_model):
    engine = tiny_llm(tiny_model, max_num_seqs=5).llm_engine
    for i in range(3):
        engine.add_request(str(i), PROMPT[i:], SamplingParams(n=2, seed=i, **SAMPLE))
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
        assert len(engine.scheduler.running) <= 5
    assert finished == {"0", "1", "2"}


def test_best_of_returns_the_most_likely_samples_once_all_finish(tiny_model):
    engine = tiny_llm(tiny_model).llm_engine
    every = run(engine, "all", PROMPT, SamplingParams(n=5, seed=3, logprobs=0, **SAMPLE))[-1].outputs
    outputs = run(engine, "best", PROMPT, SamplingParams(n=2, best_of=5, seed=3, **SAMPLE))
    assert len(outputs) == 1 and outputs[0].finished
    best = outputs[0].outputs
    ranked = sorted(every, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked] and [c.index for c in best] == [0, 1]
    assert [c.cumulative_logprob for c in best] == pytest.approx([c.cumulative_logprob for c in ranked], abs=1e-4)
    assert best[0].logprobs is None and len({tuple(c.token_ids) for c in every}) == 5
