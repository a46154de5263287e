"""Beam search equals transformers' for the same settings, shares blocks between beams, and survives a tight KV
cache; LLM.beam_search gives vLLM's output shape."""
from __future__ import annotations

import random

import pytest
import torch

from kvserve import LLM, BeamSearchParams

SETTINGS = [dict(beam_width=2, max_tokens=12), dict(beam_width=4, max_tokens=20, length_penalty=0.0),
            dict(beam_width=3, max_tokens=16, length_penalty=2.0, early_stopping=True),
            dict(beam_width=4, max_tokens=20, length_penalty=-1.0, early_stopping="never"),
            dict(beam_width=3, max_tokens=10, early_stopping="never")]


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(rng.randrange(3, 40))] for _ in range(count)]


def hf_beam_search(hf, prompt: list[int], settings: dict, eos: list[int]) -> list[list[int]]:
    """transformers' returned beams, generated tokens only, cut after the first EOS (the rest is padding)."""
    width = settings["beam_width"]
    out = hf.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                      max_new_tokens=settings["max_tokens"], length_penalty=settings.get("length_penalty", 1.0),
                      early_stopping=settings.get("early_stopping", False), eos_token_id=eos, pad_token_id=0)
    beams = []
    for sequence in out[:, len(prompt):].tolist():
        end = next((i + 1 for i, token in enumerate(sequence) if token in eos), len(sequence))
        beams.append(sequence[:end])
    return beams


def generated(output, prompt: list[int]) -> list[list[int]]:
    assert all(s.tokens[:len(prompt)] == prompt for s in output.sequences)
    return [s.tokens[len(prompt):] for s in output.sequences]


@pytest.fixture(scope="module")
def hf(hf_model):
    return hf_model("qwen2")


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("qwen2"), dtype="float32", kv_cache_memory="16MiB", max_model_len=128)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_equals_transformers(llm, hf, settings):
    batch = prompts(3, seed=settings["beam_width"])
    outputs = llm.beam_search(batch, BeamSearchParams(**settings))     # searched together, in one engine
    for prompt, output in zip(batch, outputs):
        assert generated(output, prompt) == hf_beam_search(hf, prompt, settings, [2])
        scores = [s.cum_logprob / len(s.tokens[len(prompt):]) ** settings.get("length_penalty", 1.0)
                  for s in output.sequences]
        assert scores == sorted(scores, reverse=True)
    manager = llm.llm_engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_equals_transformers_with_a_likely_second_eos(llm, hf):
    """A second EOS id the model often picks: beams finish early and three candidates per beam are weighed.
    Without a length penalty, a short finished hypothesis outscores the longer ones."""
    engine, settings = llm.llm_engine, dict(beam_width=3, max_tokens=16, length_penalty=0.0)
    for prompt in prompts(4, seed=9):
        likely = hf.generate(torch.tensor([prompt]), max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1]
        eos = [2, int(likely)]
        engine.eos_token_ids.append(eos[1])
        try:
            output = llm.beam_search([prompt], BeamSearchParams(**settings))[0]
        finally:
            engine.eos_token_ids.remove(eos[1])
        assert generated(output, prompt) == hf_beam_search(hf, prompt, settings, eos)
        best = output.sequences[0]
        assert best.finish_reason == "stop" and best.tokens[-1] in eos


def test_a_tight_kv_cache_changes_nothing(tiny_model, llm):
    batch = prompts(4, seed=5)
    params = BeamSearchParams(beam_width=4, max_tokens=20, length_penalty=0.5)
    expected = [generated(o, p) for o, p in zip(llm.beam_search(batch, params), batch)]
    tight = LLM(tiny_model("qwen2"), dtype="float32", max_model_len=128, num_gpu_blocks_override=8,
                max_num_batched_tokens=16, max_num_seqs=8)
    assert [generated(o, p) for o, p in zip(tight.beam_search(batch, params), batch)] == expected
    engine = tight.llm_engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_beams_share_the_prompt_blocks(llm):
    engine, manager = llm.llm_engine, llm.llm_engine.block_manager
    prompt = list(range(3, 43))      # 40 tokens: two full blocks and half of a third
    engine.add_request("beams", prompt, BeamSearchParams(beam_width=4, max_tokens=8))
    before = engine.prompt_tokens_total
    engine.step()                    # the prompt, computed once; its candidates become four beams
    beams = engine.scheduler.running
    assert engine.prompt_tokens_total - before == 40 and len(beams) == 4
    assert all(b.block_table == beams[0].block_table for b in beams)
    assert [manager.ref_counts[b] for b in beams[0].block_table] == [4, 4, 4]
    partial = beams[0].block_table[2]
    engine.step()                    # each beam writes its token into the shared partial block: three copy it
    assert sorted(manager.copies_this_step) == [(partial, b) for b in sorted(b for _, b in manager.copies_this_step)]
    assert len(manager.copies_this_step) == 3
    while engine.has_unfinished_requests():
        engine.step()
    assert manager.num_free_blocks == manager.num_blocks


def test_output_text_and_finish_reasons(llm):
    prompt = "The quick brown fox"
    output = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True))[0]
    tokenizer = llm.get_tokenizer()
    ids = tokenizer(prompt)["input_ids"]
    assert len(output.sequences) == 2
    for sequence in output.sequences:
        assert sequence.tokens[:len(ids)] == ids and len(sequence.tokens) == len(ids) + 6
        assert sequence.finish_reason == "length" and sequence.text == tokenizer.decode(sequence.tokens[len(ids):])


@pytest.mark.parametrize("params, message", [
    (dict(beam_width=0), "beam_width must be >= 1"), (dict(beam_width=2, max_tokens=0), "max_tokens must be >= 1"),
    (dict(beam_width=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(beam_width=2, early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(beam_width=2, temperature=-1.0), "temperature must be a finite number >= 0")])
def test_bad_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message):
        BeamSearchParams(**params)


def test_generate_points_to_beam_search(llm):
    with pytest.raises(TypeError, match=r"for beam search call LLM.beam_search"):
        llm.generate(["The quick"], BeamSearchParams(beam_width=2))


def test_too_wide_for_the_vocabulary_is_rejected_before_any_work(tiny_model):
    llm = LLM(tiny_model("qwen2"), dtype="float32", kv_cache_memory="8MiB", max_model_len=64, max_num_seqs=256,
              max_num_batched_tokens=256)
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=r"beam_width=193 is too wide .* allowed: 1\.\.192"):
        llm.beam_search([[5, 6, 7], [8, 9]], BeamSearchParams(beam_width=193))
    assert not engine.has_unfinished_requests() and not engine.requests
