"""logprobs and prompt_logprobs equal a float32 log_softmax of Hugging Face transformers' logits."""
from __future__ import annotations

import random

import pytest
import torch

from kvserve import LLM, SamplingParams

ATOL = 1e-4


@pytest.fixture(scope="module")
def llm(qwen2_path):
    # A small token budget prefills long prompts in chunks beside other sequences' decodes.
    return LLM(qwen2_path, dtype="float32", kv_cache_memory="8MiB", max_model_len=256, max_num_batched_tokens=16,
               max_num_seqs=4)


def prompts(count: int, seed: int, low: int = 3, high: int = 50) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(rng.randrange(low, high))] for _ in range(count)]


@torch.no_grad()
def hf_logprobs(qwen2_hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row i is the log-distribution of the token after ids[:i + 1]."""
    return qwen2_hf(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def check_position(entry, token: int, expected: torch.Tensor, k: int, tokenizer) -> None:
    """One position's {token id: Logprob} against the reference log-distribution ``expected`` [vocab]."""
    top = expected.topk(k)
    assert list(entry)[0] == token and set(entry) == {token, *top.indices.tolist()}
    assert entry[token].logprob == pytest.approx(expected[token].item(), abs=ATOL)
    assert entry[token].rank == int((expected >= expected[token]).sum())
    for rank, (token_id, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
        assert entry[token_id].rank == rank and entry[token_id].logprob == pytest.approx(value, abs=ATOL)
    assert all(e.decoded_token == tokenizer.decode([t]) for t, e in entry.items())


def test_logprobs_match_transformers(llm, qwen2_hf, tiny_tokenizer):
    # Logprobs are of the raw logits: temperature, top-k and penalties change the sampled tokens, not these.
    cases = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5),
             SamplingParams(temperature=0.7, top_k=20, seed=1, max_tokens=12, ignore_eos=True, logprobs=0),
             SamplingParams(temperature=1.3, seed=2, max_tokens=12, ignore_eos=True, logprobs=20,
                            presence_penalty=1.0, repetition_penalty=1.5)]
    batch = prompts(len(cases), seed=0)
    outputs = llm.generate(batch, cases, use_tqdm=False)
    for prompt, params, output in zip(batch, cases, outputs):
        out = output.outputs[0]
        assert output.prompt_logprobs is None and len(out.logprobs) == len(out.token_ids) == 12
        expected = hf_logprobs(qwen2_hf, prompt + out.token_ids)[len(prompt) - 1:-1]
        for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            check_position(entry, token, expected[i], params.logprobs, tiny_tokenizer)
        assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))
        assert out.cumulative_logprob == pytest.approx(expected.gather(1, torch.tensor(out.token_ids)[:, None]).sum(),
                                                       abs=ATOL * 12)
    # Sampled at temperature 1.3 from 384 tokens, some token is not the most likely one.
    assert any(e[t].rank > 1 for t, e in zip(outputs[2].outputs[0].token_ids, outputs[2].outputs[0].logprobs))
    assert all(len(e) == 1 for e in outputs[1].outputs[0].logprobs)   # k=0: the sampled token only


@pytest.mark.parametrize("enable_prefix_caching", [False, True])
def test_prompt_logprobs_match_transformers_in_chunks(qwen2_path, qwen2_hf, tiny_tokenizer, enable_prefix_caching):
    llm = LLM(qwen2_path, dtype="float32", kv_cache_memory="8MiB", max_model_len=256, max_num_batched_tokens=16,
              max_num_seqs=4, enable_prefix_caching=enable_prefix_caching)
    batch = prompts(3, seed=1, low=30, high=60) + [[7]]   # 2 to 4 chunks each; a 1-token prompt has no logprobs
    cases = [SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=k, logprobs=None if k == 2 else 1)
             for k in (3, 0, 2, 5)]
    outputs = llm.generate(batch, cases, use_tqdm=False)
    for prompt, params, output in zip(batch, cases, outputs):
        entries = output.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        expected = hf_logprobs(qwen2_hf, prompt)
        for i in range(1, len(prompt)):
            check_position(entries[i], prompt[i], expected[i - 1], params.prompt_logprobs, tiny_tokenizer)
        assert (output.outputs[0].logprobs is None) == (params.logprobs is None)


def test_prompt_logprobs_of_a_prefix_cached_prompt(llm):
    prompt = prompts(1, seed=5, low=40, high=41)[0]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    first = llm.generate([prompt], params, use_tqdm=False)[0].prompt_logprobs
    again = llm.generate([prompt], params, use_tqdm=False)[0].prompt_logprobs
    assert again == first and all(e is not None for e in again[1:])


def test_logprobs_survive_preemption(qwen2_path, qwen2_hf, tiny_tokenizer):
    # 8 blocks of 16 tokens for 5 requests of up to 70 tokens: sequences are preempted and recomputed.
    llm = LLM(qwen2_path, dtype="float32", num_gpu_blocks_override=8, max_model_len=128, max_num_batched_tokens=32,
              max_num_seqs=8, enable_prefix_caching=False)
    batch = prompts(5, seed=3, low=20, high=40)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    outputs = llm.generate(batch, params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert not llm.llm_engine.runner.prompt_logprobs.next   # released with their requests
    for prompt, output in zip(batch, outputs):
        out = output.outputs[0]
        expected = hf_logprobs(qwen2_hf, prompt + out.token_ids)
        assert len(output.prompt_logprobs) == len(prompt) and len(out.logprobs) == len(out.token_ids) == 30
        for i in range(1, len(prompt)):
            check_position(output.prompt_logprobs[i], prompt[i], expected[i - 1], 1, tiny_tokenizer)
        for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            check_position(entry, token, expected[len(prompt) - 1 + i], 2, tiny_tokenizer)


def test_parallel_sampling_and_streamed_outputs(llm):
    engine = llm.llm_engine
    prompt = prompts(1, seed=4)[0]
    engine.add_request("n", prompt, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True,
                                                   logprobs=2, prompt_logprobs=2))
    last = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert len(output.prompt_logprobs) == len(prompt)
            for c in output.outputs:   # every output carries the logprobs of all its tokens so far
                assert len(c.logprobs) == len(c.token_ids)
            last = output
    for child in last.outputs:
        single = llm.generate([prompt], SamplingParams(temperature=1.0, seed=3 + child.index, max_tokens=6,
                                                       ignore_eos=True, logprobs=2), use_tqdm=False)[0].outputs[0]
        assert child.token_ids == single.token_ids
        # Equal up to float noise: here the prompt comes from the prefix cache, computed in another batch.
        assert [{t: (e.rank, e.decoded_token) for t, e in d.items()} for d in child.logprobs] == \
            [{t: (e.rank, e.decoded_token) for t, e in d.items()} for d in single.logprobs]
        assert [e.logprob for d in child.logprobs for e in d.values()] == \
            pytest.approx([e.logprob for d in single.logprobs for e in d.values()], abs=ATOL)
        assert child.cumulative_logprob == pytest.approx(single.cumulative_logprob, abs=ATOL)


def test_no_logprobs_unless_asked(llm):
    output = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)[0]
    assert output.prompt_logprobs is None
    assert output.outputs[0].logprobs is None and output.outputs[0].cumulative_logprob is None
