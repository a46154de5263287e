"""Bad input is a clear error naming what is wrong, raised before any work, harming no other request."""
from __future__ import annotations

import json

import pytest

from kvserve import LLM, BeamSearchParams, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="8MiB", max_model_len=64)


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p must be in [0, 1]"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(max_tokens=4, min_tokens=5), "min_tokens must be in [0, 4]"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**63), r"seed must be in [0, 9223372036854775807]"),
    (dict(n=3, best_of=2), "best_of must be >= 3, got 2"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(n=0), "n must be >= 1"),
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-3), "frequency_penalty must be in [-2, 2]"),
    (dict(frequency_penalty="high"), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be in (0, 2]"),
    (dict(repetition_penalty=2.5), "repetition_penalty must be in (0, 2]"),
    (dict(logit_bias={5: 101.0}), "logit_bias[5] must be in [-100, 100]"),
    (dict(logit_bias={-1: 1.0}), "logit_bias token id must be >= 0"),
    (dict(logit_bias=[5]), "logit_bias must be a dict"),
    (dict(bad_words=["ok", "  "]), "bad_words must be a list of non-blank strings"),
    (dict(bad_words="word"), "bad_words"),
    (dict(logprobs=21), "logprobs must be in [0, 20], got 21"),
    (dict(logprobs=-1), "logprobs must be in [0, 20], got -1"),
    (dict(logprobs=True), "logprobs must be an integer in [0, 20]"),
    (dict(speculate="no"), "speculate must be true or false, got 'no'"),
    (dict(prompt_logprobs=21), "prompt_logprobs must be in [0, 20]"),
])
def test_invalid_sampling_params(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt, words", [
    ("", "prompt is empty"),
    ([], "prompt is empty"),
    ([1] * 64, "prompt has 64 tokens, but max_model_len is 64"),
    ([1, 2, 9999], r"token ids must be integers in \[0, 384\)"),
])
def test_invalid_prompts(llm, prompt, words):
    with pytest.raises(ValueError, match=words):
        llm.generate([prompt], SamplingParams(max_tokens=4), use_tqdm=False)


def test_stop_token_outside_vocabulary(llm):
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(["hello"], SamplingParams(stop_token_ids=[100000]), use_tqdm=False)


def test_logit_bias_outside_vocabulary(llm):
    with pytest.raises(ValueError, match=r"logit_bias token ids \[384\] are outside the vocabulary \[0, 384\)"):
        llm.generate(["hello"], SamplingParams(logit_bias={5: 1.0, 384: 1.0}), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_more_samples_than_max_num_seqs_are_rejected(tiny_model):
    llm = LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="8MiB", max_model_len=64, max_num_seqs=2)
    for params, words in ((SamplingParams(n=3), "n=3 sequences cannot run at once with max_num_seqs=2"),
                          (SamplingParams(n=2, best_of=4), "best_of=4 sequences"),
                          (BeamSearchParams(beam_width=3), "beam_width=3 sequences")):
        with pytest.raises(ValueError, match=words):
            llm.llm_engine.add_request("wide", [5, 6], params)
    assert not llm.llm_engine.has_unfinished_requests()


def test_bad_prompt_in_a_batch_starts_nothing(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["hello", ""], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_bad_request_leaves_running_requests_unharmed(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    engine = llm.llm_engine
    engine.add_request("good", [5, 6, 7], params)
    engine.step()
    for bad in ("", [1] * 100):
        with pytest.raises(ValueError):
            engine.add_request("bad", bad, params)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", [5], params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outputs] == ["good"]
    assert outputs[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("kwargs, words", [
    (dict(preemption_mode="swap"), "allowed on cpu: 'recompute'"),
    (dict(preemption_mode="evict"), "preemption_mode must be one of recompute, swap"),
    (dict(pipeline_parallel_size=0), "pipeline_parallel_size must be >= 1"),
    (dict(speculative_config={"method": "ngram"}), "speculative_config needs 'num_speculative_tokens'"),
    (dict(speculative_config={"method": "eagle3", "num_speculative_tokens": 2}),
     "speculative_config method 'eagle3' is not supported yet; supported: 'ngram', 'draft_model', 'medusa', "
     "'eagle'"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 0}),
     "speculative_config 'num_speculative_tokens' must be an integer >= 1, got 0"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "draft": 1}),
     "speculative_config has unknown keys \\['draft'\\]; allowed: method, num_speculative_tokens"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}),
     "speculative_config prompt_lookup_min=5 exceeds prompt_lookup_max=4"),
    (dict(speculative_config="ngram"), "speculative_config must be a dict"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "model": "/m"}),
     "speculative_config keys \\['model'\\] do not apply to method 'ngram', which takes prompt_lookup_max, "
     "prompt_lookup_min"),
    (dict(speculative_config={"method": "draft_model", "num_speculative_tokens": 2}),
     "speculative_config method 'draft_model' needs 'model': the draft model's folder, .gguf file or model id, got None"),
    (dict(speculative_config={"method": "medusa", "num_speculative_tokens": 2, "model": ""}),
     "speculative_config method 'medusa' needs 'model': the Medusa heads' folder or model id, got ''"),
    (dict(speculative_config={"method": "eagle", "num_speculative_tokens": 2, "model": "/m", "quantization": "fp8"}),
     "speculative_config keys \\['quantization'\\] do not apply to method 'eagle', which takes model, revision$"),
    (dict(speculative_config={"method": "draft_model", "num_speculative_tokens": 2, "model": "/m",
                              "prompt_lookup_max": 3}),
     "speculative_config keys \\['prompt_lookup_max'\\] do not apply to method 'draft_model', which takes model, "
     "revision, quantization"),
    (dict(speculative_config={"method": "draft_model", "num_speculative_tokens": 2, "model": "/m",
                              "quantization": "nf4"}),
     "speculative_config quantization 'nf4' is not supported; allowed: None, 'auto-round'"),
    (dict(quantization="nf4"), "quantization 'nf4' is not supported yet; allowed: None, 'auto-round'"),
    (dict(quantization="int8", quantization_group_size=32),
     "quantization_group_size applies to quantization='int4' \\(online int4\\), not to quantization='int8'"),
    (dict(quantization="int4", quantization_group_size=48),
     "quantization_group_size must be one of 16, 32, 64, 128, 256, got 48"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2, got 'int8'"),
    (dict(calculate_kv_scales=True), "calculate_kv_scales applies to an FP8 KV cache \\(kv_cache_dtype 'fp8', "
     "'fp8_e4m3', 'fp8_e5m2'\\), not to kv_cache_dtype='auto'"),
    (dict(kv_cache_dtype="fp8", calculate_kv_scales="yes"), "calculate_kv_scales must be True or False, got 'yes'"),
    (dict(block_size=7), "block_size must be one of"),
    (dict(kv_cache_memory="lots"), "kv_cache_memory must be a byte count"),
    (dict(max_num_seqs=0), "max_num_seqs must be >= 1"),
    (dict(max_model_len=100000), "max_model_len=100000 exceeds the model's context length 512"),
    (dict(num_gpu_blocks_override=2, max_model_len=64), "raise kv_cache_memory"),   # an explicit length stays
    (dict(device="nope"), "platform 'nope' is not installed; found: cpu"),
])
def test_invalid_engine_options(tiny_model, kwargs, words):
    with pytest.raises(ValueError, match=words):
        LLM(tiny_model("llama-tied-gqa"), **{"kv_cache_memory": "8MiB", **kwargs})


def test_missing_model_path(tmp_path):
    with pytest.raises(ValueError, match="neither a Hugging Face model folder nor a .gguf file"):
        LLM(str(tmp_path / "nowhere"))


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "llama",
                                                      "max_position_embeddings": 64}))
    with pytest.raises(ValueError, match=r"\['FooForCausalLM'\] is not supported; supported: .*LlamaForCausalLM"):
        LLM(str(tmp_path), kv_cache_memory="8MiB")


def test_a_temperature_too_small_to_divide_by_is_greedy(llm):
    greedy = llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    params = SamplingParams(temperature=1e-40, seed=1, max_tokens=12, ignore_eos=True)
    assert params.temperature == 0
    assert llm.generate(["Once upon"], params, use_tqdm=False)[0].outputs[0].token_ids == greedy
