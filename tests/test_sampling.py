"""Sampling parameters behave as documented on a real (tiny) model."""
from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams

PROMPT = [5, 17, 42, 99, 7, 3, 250]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("qwen2"), dtype="float32", kv_cache_memory="8MiB", max_model_len=256)


def tokens(llm, params, prompt=PROMPT):
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]


def test_filters_that_keep_one_token_equal_greedy(llm):
    greedy = tokens(llm, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)).token_ids
    for params in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        out = tokens(llm, SamplingParams(temperature=1.5, max_tokens=20, ignore_eos=True, seed=3, **params))
        assert out.token_ids == greedy, params


def test_seed_reproducible_and_seeds_differ(llm):
    def run(seed):
        return tokens(llm, SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=seed)).token_ids
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_engine_seed_reproducible(tiny_model):
    def run(seed):
        engine = LLM(tiny_model("qwen2"), dtype="float32", kv_cache_memory="8MiB", max_model_len=256, seed=seed)
        return tokens(engine, SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)).token_ids
    assert run(1) == run(1)


def test_max_tokens_and_length_finish(llm):
    out = tokens(llm, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    assert len(out.token_ids) == 9 and out.finish_reason == "length"


def test_output_capped_at_max_model_len(llm):
    prompt = PROMPT * 35    # 245 tokens of a 256-token context
    out = tokens(llm, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), prompt)
    assert len(out.token_ids) == 256 - len(prompt) and out.finish_reason == "length"


def test_stop_token_ids_and_min_tokens(llm):
    greedy = tokens(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).token_ids
    first = greedy[0]
    out = tokens(llm, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first]))
    assert out.token_ids == [first] and out.finish_reason == "stop" and out.stop_reason == first
    assert out.text == ""   # a stop token's text is left out, unless asked for
    out = tokens(llm, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first],
                                     include_stop_str_in_output=True))
    assert out.text == llm.get_tokenizer().decode([first]) != ""
    out = tokens(llm, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first], min_tokens=3))
    assert first not in out.token_ids[:3] and len(out.token_ids) >= 3


def test_eos_stops_unless_ignored(llm):
    eos = llm.llm_engine.eos_token_ids[0]
    greedy = tokens(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).token_ids
    # Make EOS the model's first choice by asking it to stop on that token instead.
    llm.llm_engine.eos_token_ids.append(greedy[0])
    try:
        out = tokens(llm, SamplingParams(temperature=0, max_tokens=8))
        assert out.token_ids == [greedy[0]] and out.finish_reason == "stop" and out.stop_reason is None
        assert tokens(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).token_ids == greedy
    finally:
        llm.llm_engine.eos_token_ids.remove(greedy[0])
    assert eos in llm.llm_engine.eos_token_ids


def test_stop_strings_truncate_text(llm):
    full = tokens(llm, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)).text
    stop = full[10:13]
    at = full.find(stop)
    out = tokens(llm, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))
    assert out.text == full[:at] and out.finish_reason == "stop" and out.stop_reason == stop
    out = tokens(llm, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop,
                                     include_stop_str_in_output=True))
    assert out.text == full[:at + len(stop)]


def test_text_matches_tokenizer_decode(llm):
    out = tokens(llm, SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=0))
    assert out.text == llm.get_tokenizer().decode(out.token_ids, skip_special_tokens=True)


def test_parallel_sampling_children_match_seeded_singles(llm):
    out = llm.generate([PROMPT], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for child in out.outputs:
        single = tokens(llm, SamplingParams(temperature=1.0, seed=11 + child.index, max_tokens=10, ignore_eos=True))
        assert child.token_ids == single.token_ids and child.text == single.text
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_running_text_never_shows_a_stop_string_early(llm):
    full = tokens(llm, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)).text
    stop = full[12:16]
    engine = llm.llm_engine
    engine.add_request("s", PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop))
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0].text for o in engine.step()]
    assert texts[-1] == full[:full.find(stop)]
    assert all(texts[-1].startswith(t) and stop not in t for t in texts)
