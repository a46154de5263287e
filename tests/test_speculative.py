"""Speculative decoding with n-gram prompt lookup: the proposer on its own, then the engine, whose greedy outputs
must equal those it gives without speculation, through continuous batching (beside requests that do not
speculate), chunked prefill, the prefix cache, preemption, stops and the server. test_speculative_sampling.py
checks the verification rule."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import ARCHITECTURES
from kvserve import LLM, SamplingParams
from kvserve.core.engine.sequence import Sequence
from kvserve.core.engine.speculation import NgramIndex, Proposer, SpeculativeConfig

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def ngram_proposal(token_ids: list[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    return NgramIndex(min_n, max_n).propose(token_ids, num_tokens)


def test_ngram_proposes_what_followed_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert ngram_proposal(tokens, 2, 1, 3) == [7, 8]   # "5 2 3" occurs nowhere earlier; "2 3" last before "7 8"
    assert ngram_proposal(tokens, 9, 1, 3) == [7, 8, 5, 2, 3]   # up to the end
    assert ngram_proposal(tokens, 2, 3, 3) == []   # "5 2 3" occurs nowhere earlier
    assert ngram_proposal([4, 4, 4], 3, 1, 2) == [4]   # the match may overlap the suffix
    assert ngram_proposal([6], 3, 1, 2) == []


def test_a_grown_index_proposes_what_a_fresh_one_does():
    rng = random.Random(0)
    tokens, index = [rng.randrange(6) for _ in range(5)], NgramIndex(1, 3)
    for _ in range(200):
        assert index.propose(tokens, 3) == ngram_proposal(tokens, 3, 1, 3)
        tokens += [rng.randrange(6) for _ in range(rng.randrange(1, 4))]   # a step keeps 1 to 3 tokens


def generate(path: str, speculative_config: dict | None, prompts, params, **options):
    llm = LLM(path, speculative_config=speculative_config,
              **{"dtype": "float32", "kv_cache_memory": "16MiB", "max_num_seqs": 8, **options})
    outputs = [[o.token_ids for o in out.outputs] for out in llm.generate(prompts, params, use_tqdm=False)]
    return outputs, llm.llm_engine


def repetitive_prompts(offset: int) -> list[list[int]]:
    return [[offset + 5, 17, 42, 99, 3] * 6, [offset + 7, 8, 9] * 9 + [11], list(range(offset + 20, offset + 44)) * 2]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("chunk", [None, 12], ids=["whole-prompts", "chunks-of-12"])
def test_greedy_outputs_are_those_without_speculation(tiny_model, arch, chunk):
    path = tiny_model(arch)
    prompts = repetitive_prompts(0) + repetitive_prompts(1)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    # Beside them, taking no proposals: a seeded sampled request that opts out, and a penalized greedy one.
    params = [greedy] * 4 + [SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True, speculate=False),
                             SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=30, ignore_eos=True)]
    plain, _ = generate(path, None, prompts, params, max_num_batched_tokens=chunk)
    for _ in range(2):   # the second time from the prefix cache
        speculated, engine = generate(path, NGRAM, prompts, params, max_num_batched_tokens=chunk)
        assert speculated == plain
    # Random weights seldom repeat their context, so most proposals are rejected (the kept ones are checked below).
    assert engine.spec_proposed_tokens > engine.spec_accepted_tokens
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks   # every block back, the rejected proposals' too


def test_logprobs_of_kept_tokens_are_those_without_speculation(tiny_model):
    path, prompt = tiny_model("llama-tied-gqa"), list(range(30, 50))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    plain = LLM(path, dtype="float32", kv_cache_memory="16MiB").generate([prompt], params, use_tqdm=False)
    plain = plain[0].outputs[0]
    want = plain.token_ids
    wrong = (want[8] + 1) % 384
    _, engine, final = run_with_proposals(path, prompt, params, [want[1:5], want[6:8] + [wrong] + want[9:12]])
    speculated = final.outputs[0]
    assert speculated.token_ids == want and engine.spec_accepted_tokens == 6
    for got, expected in zip(speculated.logprobs, plain.logprobs, strict=True):
        assert list(got) == list(expected)   # the kept token and the top 3, in rank order
        assert all(abs(got[t].logprob - expected[t].logprob) < 1e-5 and got[t].rank == expected[t].rank
                   for t in expected)
    assert abs(speculated.cumulative_logprob - plain.cumulative_logprob) < 1e-4


def test_an_fp8_cache_verifies_as_it_decodes(tiny_model):
    path, params = tiny_model("llama-tied-gqa"), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain, _ = generate(path, None, repetitive_prompts(0), params, kv_cache_dtype="fp8")
    speculated, engine = generate(path, NGRAM, repetitive_prompts(0), params, kv_cache_dtype="fp8")
    assert speculated == plain and engine.spec_verifications > 0


def test_preempted_speculating_outputs_are_those_without_speculation(tiny_model):
    path, prompts = tiny_model("llama-tied-gqa"), repetitive_prompts(0)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain, _ = generate(path, None, prompts, params)
    speculated, engine = generate(path, NGRAM, prompts, params, num_gpu_blocks_override=8, max_model_len=128)
    assert speculated == plain
    assert engine.scheduler.num_preemptions > 0 and engine.spec_verifications > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def run_with_proposals(path: str, prompt: list[int], params: SamplingParams, proposals: list[list[int]]):
    """Steps one request, giving it each of ``proposals`` in turn once it decodes (as a drafter would), then
    none; returns its tokens after each step, the engine and the request's last output. (16-token blocks: a long rejected proposal takes
    a block that must come back.)"""
    engine = LLM(path, dtype="float32", kv_cache_memory="16MiB").llm_engine
    engine.add_request("r", prompt, params)
    engine.step()
    seq, outputs = engine.scheduler.running[0], []
    while engine.has_unfinished_requests():
        seq.proposal = list(proposals.pop(0)) if proposals else []
        final = engine.step()[0]
        outputs.append(seq.token_ids[len(prompt):])
        assert len(seq.block_table) <= engine.block_manager.blocks_for(seq.num_tokens)   # rejected ones' returned
    return outputs, engine, final


def test_right_proposals_are_kept_and_the_first_wrong_one_ends_them(tiny_model):
    path = tiny_model("llama-tied-gqa")
    prompt, params = list(range(30, 50)), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = generate(path, None, [prompt], params)[0][0][0]
    wrong = (want[8] + 1) % 384
    outputs, engine, _ = run_with_proposals(path, prompt, params, [want[1:5], want[6:8] + [wrong] + want[9:16]])
    assert outputs[0] == want[:6]   # four proposals kept, then the target's own next token
    assert outputs[1] == want[:9]   # two kept, then the target's token where the third was wrong
    assert outputs[-1] == want and len(outputs) == 2 + 24 - 9
    assert (engine.spec_verifications, engine.spec_proposed_tokens, engine.spec_accepted_tokens) == (2, 14, 6)
    assert engine.spec_accepted_per_position == {0: 2, 1: 2, 2: 1, 3: 1}
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("limit", ["stop", "max_tokens"])
def test_stops_and_token_limits_cut_kept_proposals(tiny_model, limit):
    path = tiny_model("llama-tied-gqa")
    prompt = list(range(30, 50))
    free = generate(path, None, [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0][0][0]
    cut = dict(stop=dict(max_tokens=24, stop_token_ids=[free[4]]), max_tokens=dict(max_tokens=4))[limit]
    params = SamplingParams(temperature=0, ignore_eos=True, **cut)
    outputs, engine, _ = run_with_proposals(path, prompt, params, [free[1:9]])
    assert outputs == [free[:5] if limit == "stop" else free[:4]]
    assert engine.generation_tokens_total == len(outputs[0])   # not the accepted tokens past the limit
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_proposals_stay_within_the_token_limit_and_skip_what_cannot_speculate():
    config = SpeculativeConfig.from_dict(NGRAM)

    def proposal(prompt: list[int], **options) -> list[int]:
        seq = Sequence("r", prompt, SamplingParams(**{"temperature": 0, **options}), 100, [])
        seq.num_computed_tokens = len(prompt) - 1
        Proposer(config).propose([seq])
        return seq.proposal

    prompt = [1, 2, 3, 4, 5, 6, 1, 2]
    assert proposal(prompt) == [3, 4, 5, 6]
    assert proposal(prompt, max_tokens=3) == [3, 4]   # the target's own token makes the third
    assert proposal(prompt, temperature=0.7) == proposal(prompt, logprobs=2) == [3, 4, 5, 6]
    for options in (dict(speculate=False), dict(repetition_penalty=1.2),
                    dict(logit_bias={3: -5.0}), dict(min_tokens=2)):
        assert proposal(prompt, **options) == [], options


def test_smollm2_greedy_outputs_are_those_without_speculation(smollm2_path):
    text = (Path(__file__).parent / "data" / "english.txt").read_text().strip()
    prompt = f"Request 1-0.\nCopy the text below exactly, changing nothing.\n\n{text}\n\nCopy:\n"
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    # In the platform's default dtype (bfloat16 where the CPU has it): verification runs the decode kernels, so
    # it rounds exactly as decoding one token a step does (in bfloat16 this prompt meets a near-tie where the
    # prefill kernels' rounding picks another token).
    options = dict(dtype="auto", kv_cache_memory="64MiB", max_model_len=1024)
    plain, _ = generate(smollm2_path, None, [prompt], params, **options)
    speculated, engine = generate(smollm2_path, NGRAM, [prompt], params, **options)
    assert speculated == plain
    # Much of the output repeats the text (or itself): many proposals hold.
    assert engine.spec_accepted_tokens > len(plain[0][0]) / 4


def test_the_server_speculates_and_counts_it(tiny_model):
    from server_utils import metrics, openai_client, start_server, stop_server, tiny_args

    prompt = [5, 17, 42, 99, 3] * 6
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected, _ = generate(tiny_model("llama-tied-gqa"), None, [prompt], params)
    _, engine = generate(tiny_model("llama-tied-gqa"), NGRAM, [prompt], params)
    server = start_server(tiny_args(tiny_model, "--speculative-config", json.dumps(NGRAM)))
    try:
        client = openai_client(server)
        stream = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=30,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        text = "".join(chunk.choices[0].text for chunk in stream)
        counts = metrics(server)
        opted_out = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=30,
                                              temperature=0, extra_body={"ignore_eos": True, "speculate": False})
        counts_after = metrics(server)
    finally:
        stop_server(server)
    assert text == opted_out.choices[0].text == engine.tokenizer.decode(expected[0][0])
    assert engine.spec_verifications > 0
    assert [counts[f"kvserve:spec_decode_num_{name}_total"] for name in ("drafts", "draft_tokens", "accepted_tokens")] \
        == [engine.spec_verifications, engine.spec_proposed_tokens, engine.spec_accepted_tokens]
    assert all(counts_after[name] == counts[name] for name in counts if "spec_decode" in name)   # the opted-out one
    assert [counts[f'kvserve:spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}}'] for i in range(4)] \
        == [engine.spec_accepted_per_position[i] for i in range(4)]
