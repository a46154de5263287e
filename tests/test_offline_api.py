"""The offline LLM as vLLM users call it: prompt forms, the progress bar, and the start-up log line."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from kvserve import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Once upon a time"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="8MiB")


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_text_and_token_prompt_dicts(llm):
    expected = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    ids = [o.prompt_token_ids for o in expected]
    as_text = llm.generate([{"prompt": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert tokens(as_text) == tokens(expected) and [o.prompt for o in as_text] == PROMPTS
    as_ids = llm.generate([{"prompt_token_ids": i} for i in ids], GREEDY, use_tqdm=False)
    assert tokens(as_ids) == tokens(expected)
    single = llm.generate({"prompt": PROMPTS[1]}, GREEDY, use_tqdm=False)
    assert tokens(single) == tokens(expected)[1:]


def test_prompt_dict_without_prompt_is_a_value_error(llm):
    with pytest.raises(ValueError, match=r"'prompt' \(text\) or 'prompt_token_ids'.*\['text'\]"):
        llm.generate([PROMPTS[0], {"text": PROMPTS[1]}], GREEDY)
    assert not llm.llm_engine.has_unfinished_requests()   # nothing started


@pytest.mark.parametrize("use_tqdm", [True, False])
def test_progress_bar_on_stderr(llm, capsys, use_tqdm):
    llm.generate(PROMPTS * 2, GREEDY, use_tqdm=use_tqdm)
    err = capsys.readouterr().err
    assert ("Processed prompts" in err) == use_tqdm, err
    if use_tqdm:
        assert "4/4" in err, err


def test_start_up_line_gives_load_time_and_kv_cache_size(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="kvserve"):
        llm = LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="8MiB")
    runner = llm.llm_engine.runner
    line = next((r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")), None)
    assert line is not None, caplog.text
    match = re.search(r" in (\d+\.\d)s; KV cache (\d+\.\d\d) GiB = (\d+) tokens in (\d+) blocks$", line)
    assert match, line
    assert float(match[2]) == pytest.approx(runner.kv_cache_bytes / 2**30, abs=0.005)
    assert (int(match[3]), int(match[4])) == (runner.num_blocks * 16, runner.num_blocks)
    # The weights as loaded: transformers' parameters, the tied head once, in float32.
    hf = AutoModelForCausalLM.from_pretrained(tiny_model("llama-tied-gqa"))
    assert runner.built.weight_bytes == 4 * sum(p.numel() for p in hf.parameters())
    assert f"weights {runner.built.weight_bytes / 2**20:.1f} MiB)" in line


def test_dummy_load_format_needs_no_weights(tiny_model, tmp_path):
    # vLLM's --load-format dummy: a config and tokenizer are enough, for benchmarks of models one cannot download.
    source = Path(tiny_model("llama-tied-gqa"))
    for file in source.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, tmp_path / file.name)
    with pytest.raises(ValueError, match="no \\*.safetensors \\(or pytorch_model\\*.bin\\) weights"):
        LLM(str(tmp_path), dtype="float32", kv_cache_memory="8MiB")
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory="8MiB", load_format="dummy")
    assert all(0 < p.abs().max() <= 1e-3 for p in llm.llm_engine.runner.model.parameters())
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy, got 'random'"):
        LLM(str(tmp_path), load_format="random")
