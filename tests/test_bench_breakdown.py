"""`kvserve bench throughput --breakdown`: each step's operations and bytes as the model's shapes give them, and
the run's time split into prefill steps, decode steps and the rest, against their bounds."""
from __future__ import annotations

import json
import subprocess

import pytest
from transformers import AutoConfig

from kvserve import LLM, SamplingParams
from kvserve.core.bench.breakdown import time_steps


def test_each_step_costs_what_the_models_shapes_give(tiny_model):
    path = tiny_model("qwen2-sliding")   # its first layer attends globally, the others over 24 positions
    config = AutoConfig.from_pretrained(path)
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB")
    engine = llm.llm_engine
    timed = time_steps(engine)
    prompt = list(range(5, 45))
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)

    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_size = hidden // heads
    body = config.num_hidden_layers * (hidden * (heads + 2 * kv_heads) * head_size + heads * head_size * hidden
                                       + 3 * hidden * config.intermediate_size)
    windows = [config.sliding_window if kind == "sliding_attention" else None for kind in config.layer_types]
    assert None in windows and config.sliding_window in windows

    def attended(positions):   # per head dimension, over the layers: each query sees its window's positions
        return heads * head_size * sum(min(p, w or p) for w in windows for p in positions)

    kv_bytes_per_token = config.num_hidden_layers * 2 * kv_heads * head_size * 4
    n = len(prompt)
    expected = [(2 * (body * n + hidden * config.vocab_size + 2 * attended(range(1, n + 1))), n),
                (2 * (body + hidden * config.vocab_size + 2 * attended([n + 1])), n + 1)]
    assert [(prefill, flops) for prefill, _, flops, _ in timed.steps] == [(True, expected[0][0]),
                                                                           (False, expected[1][0])]
    weights = engine.runner.built.weight_bytes
    assert [read for *_, read in timed.steps] == [weights + kv_bytes_per_token * seq_len for _, seq_len in expected]


def test_the_report_splits_the_run_and_sets_each_part_against_its_bound(tiny_model, tmp_path):
    path = tmp_path / "result.json"
    run = subprocess.run(["kvserve", "bench", "throughput", "--model", tiny_model("qwen2-big-vocab"), "--dtype",
                          "float32", "--kv-cache-memory", "64MiB", "--num-prompts", "4", "--input-len", "8:16",
                          "--output-len", "5", "--breakdown", "--disable-tqdm", "--output-json", str(path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(path.read_text())
    parts = result["breakdown"]
    assert "prefill_of_bound:" in run.stdout and parts["matmul_tflop_s"] > 0 and parts["read_gb_s"] > 0
    # The four prompts prefill in one step, which gives each its first token; four more tokens take four steps.
    assert (parts["prefill_steps"], parts["decode_steps"]) == (1, 4)
    assert parts["prefill_s"] + parts["decode_s"] + parts["other_s"] == pytest.approx(result["elapsed_s"], abs=0.01)
    for kind in ("prefill", "decode"):
        assert parts[f"{kind}_bound_s"] > 0
        assert parts[f"{kind}_of_bound"] == pytest.approx(parts[f"{kind}_bound_s"] / parts[f"{kind}_s"], rel=2e-3)


def test_a_mixture_of_experts_is_refused(tiny_model):
    run = subprocess.run(["kvserve", "bench", "throughput", "--model", tiny_model("mixtral"), "--num-prompts", "2",
                          "--input-len", "8", "--output-len", "2", "--breakdown"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "--breakdown's cost model counts dense layers" in run.stderr


def test_a_split_engine_is_refused_before_it_loads(tiny_model):
    run = subprocess.run(["kvserve", "bench", "throughput", "--model", tiny_model("qwen2-big-vocab"), "-tp", "2",
                          "--breakdown"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--breakdown times the steps of one engine" in run.stderr
    assert "--tensor-parallel-size 2" in run.stderr
