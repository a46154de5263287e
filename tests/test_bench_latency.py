"""`kvserve bench latency` run as a user runs it, on a tiny model."""
from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.slow

LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


def bench_latency(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["kvserve", "bench", "latency", "--disable-tqdm", *args], capture_output=True, text=True,
                          timeout=300)


def test_latency_reports_percentiles(tiny_model, tmp_path):
    path = tmp_path / "latency.json"
    # The workload draws token ids up to 30000: a tiny model with that vocabulary.
    result = bench_latency("--model", tiny_model("qwen2-big-vocab"), "--dtype", "float32", "--kv-cache-memory",
                           "16MiB", "--input-len", "16", "--output-len", "4", "--num-iters", "2",
                           "--num-iters-warmup", "1", "--batch-size", "3", "--output-json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(path.read_text())
    assert {"model", "dtype", "input_len", "output_len", "batch_size", "num_iters", *LATENCIES} <= report.keys()
    assert (report["dtype"], report["input_len"], report["output_len"], report["batch_size"],
            report["num_iters"]) == ("float32", 16, 4, 3, 2)
    for name in LATENCIES:
        stats = report[name]
        assert set(stats) == {"mean", "median", "p50", "p90", "p99"}
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] and stats["mean"] > 0, (name, stats)
    assert report["e2el_ms"]["mean"] > report["ttft_ms"]["mean"]
    assert "Latency Benchmark Result" in result.stdout and "tpot_ms" in result.stdout


@pytest.mark.parametrize("option, value", [("--num-iters", "0"), ("--output-len", "0"), ("--num-iters-warmup", "-1"),
                                           ("--batch-size", "0")])
def test_bad_options_are_clear_errors(option, value):
    # Checked before the model loads.
    result = bench_latency(option, value)
    assert result.returncode == 2 and option in result.stderr and value in result.stderr, result.stderr


def test_a_prompt_file_with_speculation_reports_acceptance(tiny_model, tmp_path):
    prompt, path = tmp_path / "prompt.txt", tmp_path / "latency.json"
    prompt.write_text("Repeat this: a paged KV cache stores keys and values in blocks. " * 4)
    result = bench_latency("--model", tiny_model("llama-tied-gqa"), "--dtype", "float32", "--kv-cache-memory", "16MiB",
                           "--prompt-file", str(prompt), "--output-len", "24", "--num-iters", "2",
                           "--num-iters-warmup", "1", "--speculative-config",
                           '{"method": "ngram", "num_speculative_tokens": 3}', "--output-json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(path.read_text())
    assert report["prompt_file"] == str(prompt) and report["input_len"] > 40
    spec = report["speculation"]
    assert spec["verifications"] > 0 and spec["proposed_tokens"] >= spec["accepted_tokens"] >= 0
    assert spec["acceptance_rate"] == round(spec["accepted_tokens"] / spec["proposed_tokens"], 4)
    assert spec["mean_acceptance_length"] == round(1 + spec["accepted_tokens"] / spec["verifications"], 3)
    rates = spec["acceptance_rate_per_position"]
    assert len(rates) == 3 and rates == sorted(rates, reverse=True)   # a position is kept only after those before
    assert abs(sum(rates) * spec["verifications"] - spec["accepted_tokens"]) < 0.01 * spec["verifications"]


def test_an_unreadable_prompt_file_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "missing.txt")
    result = bench_latency("--prompt-file", missing)
    assert result.returncode == 2 and "--prompt-file" in result.stderr and missing in result.stderr, result.stderr
