"""Structured outputs offline on SmolLM2: JSON schemas, regexes, choices and grammars hold on sampled outputs,
compose with batching, n > 1, preemption and speculation, and bad constraints are refused before any work."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from kvserve import LLM, SamplingParams, StructuredOutputsParams
from kvserve.core.config import StructuredOutputsConfig
from kvserve.core.engine.llm_engine import EngineStepError
from kvserve.core.layers.logits_processors import apply_token_bitmask
from kvserve.core.structured_outputs.manager import StructuredOutputManager

pytestmark = pytest.mark.slow

PROMPTS = ["Describe a person as JSON.", "Write a phone number.", "Pick a colour.", "Say yes or no."]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
COLOURS = ["red", "green", "light blue"]
GRAMMAR = 'root ::= ("yes" | "no") " because " reason ("," reason)?\nreason ::= "cold" | "warm" | [0-9]'
GRAMMAR_LANGUAGE = r"(yes|no) because (cold|warm|[0-9])(,(cold|warm|[0-9]))?"
SEEDS = range(4)
ENGINE = dict(dtype="float32", max_model_len=512, kv_cache_memory="64MiB")


def constrained(**kind) -> dict:
    return dict(structured_outputs=StructuredOutputsParams(**kind))


def holds(params: SamplingParams, text: str) -> bool:
    constraint = params.structured_outputs
    if constraint.json is not None:
        jsonschema.validate(json.loads(text), constraint.json)
        return True
    if constraint.json_object:
        return isinstance(json.loads(text), dict)
    if constraint.choice is not None:
        return text in constraint.choice
    return re.fullmatch(PHONE if constraint.regex else GRAMMAR_LANGUAGE, text) is not None


CONSTRAINTS = [constrained(json=PERSON), constrained(regex=PHONE), constrained(choice=COLOURS),
               constrained(grammar=GRAMMAR)]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, **ENGINE)


def test_each_kind_of_constraint_holds_on_every_sampled_output(llm):
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=80, **kind) for kind in CONSTRAINTS
              for seed in SEEDS]
    prompts = [[{"role": "user", "content": PROMPTS[i // len(SEEDS)]}] for i in range(len(params))]
    outputs = llm.chat(prompts, params, use_tqdm=False)
    for p, output in zip(params, outputs):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion
        assert holds(p, completion.text), (p.structured_outputs, completion.text)
    assert not llm.llm_engine.grammars.matchers   # released with their requests


def test_n_samples_each_follow_their_own_matcher_with_logprobs(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=120, logprobs=1, **constrained(json_object=True))
    completions = llm.generate(["A JSON object describing a cat:"], params, use_tqdm=False)[0].outputs
    assert len(completions) == 3
    for completion in completions:
        assert [token in entry for token, entry in zip(completion.token_ids, completion.logprobs)] == \
            [True] * len(completion.token_ids)
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict), completion.text
        else:
            assert completion.text.startswith("{")


def test_the_guidance_backend_holds_every_kind_of_constraint(smollm2_path):
    llm = LLM(smollm2_path, **ENGINE, structured_outputs_backend="guidance")
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=80, **kind) for kind in CONSTRAINTS
              for seed in SEEDS[:2]]
    prompts = [[{"role": "user", "content": PROMPTS[i // 2]}] for i in range(len(params))]
    for p, output in zip(params, llm.chat(prompts, params, use_tqdm=False)):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop" and holds(p, completion.text), (p.structured_outputs, completion)
    assert {backend.name for backend in llm.llm_engine.grammars.backends.values()} == {"guidance"}


def test_unconstrained_requests_keep_their_greedy_tokens_beside_constrained_ones(llm):
    free = SamplingParams(temperature=0, max_tokens=24)
    prompts = ["The capital of France is", "Once upon a time"]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
    mixed = llm.generate(prompts + PROMPTS, [free, free] + [SamplingParams(temperature=0, max_tokens=40, **kind)
                                                            for kind in CONSTRAINTS], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:2]] == alone


def test_constrained_outputs_survive_preemption_and_speculation(llm, smollm2_path):
    digits = constrained(json={"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                               "minItems": 24, "maxItems": 24})
    params = [SamplingParams(temperature=0, max_tokens=80, **kind) for kind in CONSTRAINTS + [digits] * 2]
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS + ["Count.", "List digits."]]
    expected = [o.outputs[0].token_ids for o in llm.chat(prompts, params, use_tqdm=False)]
    # 160 tokens for 6 sequences of about 35 + 50 tokens: they cannot all fit, so some are preempted.
    stressed = LLM(smollm2_path, **{**ENGINE, "kv_cache_memory": None, "max_model_len": 160},
                   num_gpu_blocks_override=10, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    outputs = stressed.chat(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    engine = stressed.llm_engine
    assert engine.scheduler.num_preemptions > 0 and engine.spec_accepted_tokens > 0
    assert json.loads(outputs[-1].outputs[0].text) and outputs[-1].outputs[0].finish_reason == "stop"
    sampled = [SamplingParams(temperature=1.0, seed=seed, max_tokens=80, **kind) for kind in CONSTRAINTS
               for seed in SEEDS[:2]]
    outputs = stressed.chat([prompts[i // 2] for i in range(len(sampled))], sampled, use_tqdm=False)
    for p, output in zip(sampled, outputs):
        assert holds(p, output.outputs[0].text), (p.structured_outputs, output.outputs[0].text)


@pytest.mark.parametrize("kind, message", [
    (dict(json={"type": "objekt"}), "structured_outputs.json is not a valid JSON schema"),
    (dict(json="{not json"), "structured_outputs.json is not valid JSON"),
    (dict(regex="(unclosed"), "structured_outputs.regex cannot be compiled"),
    (dict(grammar="root ::= undefined_rule"), "structured_outputs.grammar cannot be compiled"),
    (dict(choice=[]), "structured_outputs.choice must be a non-empty list of strings"),
    (dict(regex="a", choice=["a"]), "exactly one of json, regex, choice, grammar, json_object; got regex, choice"),
    (dict(), "exactly one of"),
])
def test_bad_constraints_are_refused_before_any_work(llm, kind, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(["Hello"], SamplingParams(max_tokens=4, **constrained(**kind)), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_a_constraint_refuses_min_tokens_and_unknown_keys():
    with pytest.raises(ValueError, match="min_tokens cannot be combined with structured_outputs"):
        SamplingParams(min_tokens=2, **constrained(regex="a+"))
    with pytest.raises(ValueError, match=r"unknown keys \['jsn'\]; allowed: json, regex"):
        SamplingParams(structured_outputs={"jsn": {}})


def test_size_and_time_limits_are_reported_and_compiles_are_cached(llm):
    tokenizer, vocab = llm.llm_engine.tokenizer, llm.llm_engine.runner.vocab_size
    small = StructuredOutputManager(StructuredOutputsConfig(max_bytes=100), tokenizer, vocab, [2])
    with pytest.raises(ValueError, match=r"structured_outputs.json is \d+ bytes, over the limit of 100 "
                                         r"\(structured_outputs_max_bytes\)"):
        small.compile(StructuredOutputsParams(json=PERSON))
    hasty = StructuredOutputManager(StructuredOutputsConfig(compile_timeout=1e-4), tokenizer, vocab, [2])
    with pytest.raises(ValueError, match=r"took longer than 0.0001 s \(structured_outputs_compile_timeout\)"):
        hasty.compile(StructuredOutputsParams(json=PERSON))
    first = small.compile(StructuredOutputsParams(regex="[ab]+"))
    assert small.compile(StructuredOutputsParams(regex="[ab]+"))[1] is first[1]


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_each_backend_masks_the_logits_as_its_library_does(llm, backend):
    import xgrammar

    tokenizer, vocab = llm.llm_engine.tokenizer, llm.llm_engine.runner.vocab_size
    manager = StructuredOutputManager(StructuredOutputsConfig(backend=backend), tokenizer, vocab, [2])
    compiled = manager.compile(StructuredOutputsParams(json=PERSON))
    matchers = [compiled[0].matcher(compiled[1]) for _ in range(3)]
    for token in tokenizer.encode('{"name": "Al', add_special_tokens=False):
        assert matchers[1].accept(token)
    bits = torch.full((3, (vocab + 31) // 32), -1, dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill(bits, row)
    logits = torch.randn(3, vocab)
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, bits)
    assert torch.equal(apply_token_bitmask(logits, bits), expected)
    allowed = torch.isfinite(expected[0]).nonzero().flatten().tolist()
    assert tokenizer.decode(allowed[:1]).startswith("{") and len(allowed) < vocab


def wide_schema(fields: int) -> dict:
    """An object of ``fields`` optional patterned strings: seconds to compile (4.6 s for 1000 here), under 64 KiB."""
    return {"type": "object", "properties": {f"f{i}": {"type": "string", "pattern": f"[a-z]{{{i % 7 + 1},{i % 7 + 9}}}"}
                                             for i in range(fields)}}


def test_a_request_waits_for_its_grammar_while_the_others_run(tiny_model):
    engine = LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="16MiB").llm_engine
    # Both compile workers busy with large schemas, so that the request's own grammar waits its turn however fast
    # it compiles (a regex takes milliseconds once the backend is warm: too short to watch the wait).
    for fields in (1000, 999):
        engine.grammars._compilation(StructuredOutputsParams(json=wide_schema(fields)))
    free = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("free", [5, 6, 7], free, prompt_token_ids=[5, 6, 7])
    constrained_params = SamplingParams(temperature=1.0, seed=1, max_tokens=16, **constrained(regex="[a-e]{3,9}!"))
    engine.add_request("constrained", [8, 9], constrained_params, prompt_token_ids=[8, 9])   # not validated
    assert "constrained" in engine.grammars.held
    tokens_while_held, finished = 0, {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if "constrained" in engine.grammars.held:
            tokens_while_held = max([tokens_while_held] + [len(o.outputs[0].token_ids) for o in outputs
                                                            if o.request_id == "free"])
        finished.update((o.request_id, o.outputs[0]) for o in outputs if o.finished)
    assert tokens_while_held > 0
    assert re.fullmatch("[a-e]{3,9}!", finished["constrained"].text) and len(finished["free"].token_ids) == 40


def test_a_held_request_whose_grammar_is_too_slow_fails_alone(tiny_model):
    engine = LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="16MiB",
                 structured_outputs_compile_timeout=1e-4).llm_engine
    for fields in (1000, 999):   # the request's grammar waits behind these, as above
        engine.grammars._compilation(StructuredOutputsParams(json=wide_schema(fields)))
    engine.add_request("free", [5, 6, 7], SamplingParams(temperature=0, max_tokens=8), prompt_token_ids=[5, 6, 7])
    engine.add_request("slow", [8, 9], SamplingParams(**constrained(regex="[a-e]+")), prompt_token_ids=[8, 9])
    with pytest.raises(EngineStepError, match=r"\['slow'\].*structured_outputs_compile_timeout"):
        while engine.has_unfinished_requests():
            engine.step()
    assert "slow" not in engine.requests and not engine.grammars.held
    while engine.has_unfinished_requests():
        finished = [o for o in engine.step() if o.finished]
    assert finished[0].request_id == "free" and len(finished[0].outputs[0].token_ids) == 8
