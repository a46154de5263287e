"""The benchmark commands run, and report what they measured."""
from __future__ import annotations

import json
import subprocess

import pytest

from kvserve.core.bench.throughput import parse_range, random_workload

pytestmark = pytest.mark.slow


def test_w1_is_the_published_algorithm():
    # The issue that defines W1 lets other engines replay it: numpy's default_rng(0), lengths then token ids.
    w1 = random_workload(32, (64, 256), seed=0)
    assert [len(p) for p in w1[:8]] == [228, 186, 162, 116, 123, 71, 78, 67]
    assert w1[0][:5] == [3589, 26032, 1640, 16702, 3331] and sum(map(len, w1)) == 5287


def test_workload_is_reproducible_and_prefix_is_separate():
    plain = random_workload(8, (64, 256), seed=0)
    assert plain == random_workload(8, (64, 256), seed=0)
    assert all(64 <= len(p) <= 256 and all(1000 <= t < 30000 for t in p) for p in plain)
    shared = random_workload(8, (64, 256), seed=0, shared_prefix_len=100)
    assert [p[100:] for p in shared] == plain and len({tuple(p[:100]) for p in shared}) == 1


@pytest.mark.parametrize("text", ["0:4", "9:3", "a:b", ""])
def test_bad_ranges(text):
    with pytest.raises(ValueError, match="range"):
        parse_range(text)


def bench(tmp_path, *args: str) -> dict:
    path = tmp_path / "result.json"
    result = subprocess.run(["kvserve", "bench", "throughput", *args, "--output-json", str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "output_tok_s:" in result.stdout   # the text report
    assert ("Processed prompts" in result.stderr) != ("--disable-tqdm" in args), result.stderr   # the progress bar
    return json.loads(path.read_text())


def test_throughput_reports_prefix_cache_savings(tiny_model, tmp_path):
    # The workload draws token ids up to 30000: a tiny model with that vocabulary.
    common = ["--model", tiny_model("qwen2-big-vocab"), "--dtype", "float32", "--kv-cache-memory", "64MiB",
              "--num-prompts", "6", "--input-len", "8:16", "--output-len", "4", "--shared-prefix-len", "64"]
    cached = bench(tmp_path, *common)
    uncached = bench(tmp_path, *common, "--no-enable-prefix-caching", "--disable-tqdm")
    assert cached["prompt_tokens"] == uncached["prompt_tokens"] == uncached["prompt_tokens_computed"]
    assert cached["prompt_tokens_computed"] <= uncached["prompt_tokens_computed"] - 5 * 64
    assert cached["prefix_cache_hit_rate"] > 0 and uncached["prefix_cache_hit_rate"] == 0
    assert cached["requests"] == 6 and cached["output_tokens"] == 6 * 4


def test_throughput_against_transformers(tiny_model, tmp_path):
    model = tiny_model("qwen2-big-vocab")
    result = bench(tmp_path, "--model", model, "--dtype", "float32", "--kv-cache-memory", "64MiB",
                   "--num-prompts", "4", "--input-len", "8:16", "--output-len", "4", "--baseline", "hf")
    for report in (result, result["baseline"]):
        assert report["model"] == model and report["dtype"] == "float32"
        assert report["elapsed_s"] > 0 and report["total_tok_s"] > report["output_tok_s"] > 0
    assert result["baseline"]["engine"] == "hf"
    assert result["speedup"] == pytest.approx(result["output_tok_s"] / result["baseline"]["output_tok_s"], rel=0.02)


@pytest.mark.parametrize("args, message", [
    (["--baseline", "vllm"], "--baseline-python"),
    (["--baseline-python", "/usr/bin/python3"], "only used with --baseline vllm"),
    (["--baseline", "vllm", "--baseline-python", "/no/such/python"], "is not a file"),
    (["--baseline", "llama.cpp"], "--baseline llama.cpp needs --baseline-python"),
    (["--baseline", "llama.cpp", "--baseline-python", "/usr/bin/python3"], "--baseline llama.cpp runs a .gguf file"),
    (["--num-prompts", "0"], "--num-prompts must be >= 1, got 0"),
    (["--output-len", "0"], "--output-len must be >= 1, got 0"),
    (["--shared-prefix-len", "-3"], "--shared-prefix-len must be >= 0, got -3"),
    (["--lora-adapters", "/no/such/adapter"], "add --enable-lora"),
    (["--enable-lora", "--lora-adapters", "/no/such/adapter", "--breakdown"], "run it without --breakdown"),
])
def test_bad_options_are_refused_before_the_model_loads(tiny_model, args, message):
    result = subprocess.run(["kvserve", "bench", "throughput", "--model", tiny_model("qwen2-big-vocab"),
                             "--kv-cache-memory", "64MiB", "--num-prompts", "2", "--input-len", "8",
                             "--output-len", "2", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and message in result.stderr


def test_throughput_under_a_json_schema_beside_the_same_run_unconstrained(tiny_model, tmp_path):
    result = bench(tmp_path, "--model", tiny_model("qwen2-big-vocab"), "--dtype", "float32", "--kv-cache-memory",
                   "64MiB", "--num-prompts", "3", "--input-len", "8:16", "--output-len", "6", "--json-schema")
    constrained = result["json_schema"]
    assert constrained["output_tokens"] == result["output_tokens"] == 3 * 6
    assert constrained["prompt_tokens_computed"] == result["prompt_tokens_computed"] == result["prompt_tokens"]
    assert result["json_schema_ratio"] == round(constrained["output_tok_s"] / result["output_tok_s"], 2)
    compile_s = constrained["compile_s"]
    assert set(compile_s) == {"backend_start", "cold", "cached"} and compile_s["cached"] < compile_s["cold"]


def test_throughput_of_adapters_in_turn_against_the_base_model_alone(tiny_model, tmp_path):
    from lora_adapters import ALL_PROJECTIONS, save_adapter

    model = tiny_model("qwen2-big-vocab")
    adapters = [save_adapter(model, str(tmp_path / f"adapter-{i}"), seed=i, targets=ALL_PROJECTIONS)[0]
                for i in range(2)]
    result = bench(tmp_path, "--model", model, "--dtype", "float32", "--kv-cache-memory", "64MiB",
                   "--num-prompts", "4", "--input-len", "8:16", "--output-len", "4", "--enable-lora",
                   "--max-loras", "2", "--lora-adapters", *adapters)
    base = result["base_model_alone"]
    assert result["adapters"] == 2 and result["output_tokens"] == base["output_tokens"] == 4 * 4
    assert result["lora_ratio"] == pytest.approx(result["output_tok_s"] / base["output_tok_s"], rel=0.02)
    # The prompts do run with the adapters: one that is not there stops the run, named.
    missing = subprocess.run(["kvserve", "bench", "throughput", "--model", model, "--kv-cache-memory", "64MiB",
                              "--num-prompts", "2", "--input-len", "8", "--output-len", "2", "--enable-lora",
                              "--lora-adapters", adapters[0], str(tmp_path / "no-such-adapter")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no-such-adapter" in missing.stderr, missing.stderr
