"""The benchmark commands run, and report what they measured."""
from __future__ import annotations

import json
import subprocess

import pytest

from kvserve.core.bench.throughput import parse_range, random_workload


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


def bench(*args: str) -> dict:
    result = subprocess.run(["kvserve", "bench", "throughput", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_throughput_reports_prefix_cache_savings(tiny_model):
    # The workload draws token ids up to 30000: a tiny model with that vocabulary.
    common = ["--model", tiny_model("qwen2-big-vocab"), "--dtype", "float32", "--kv-cache-memory", "64MiB",
              "--num-prompts", "6", "--input-len", "8:16", "--output-len", "4", "--shared-prefix-len", "64"]
    cached = bench(*common)
    uncached = bench(*common, "--no-enable-prefix-caching")
    assert cached["prompt_tokens"] == uncached["prompt_tokens"] == uncached["prompt_tokens_computed"]
    assert cached["prompt_tokens_computed"] <= uncached["prompt_tokens_computed"] - 5 * 64
    assert cached["prefix_cache_hit_rate"] > 0 and uncached["prefix_cache_hit_rate"] == 0
    assert cached["requests"] == 6 and cached["output_tokens_per_s"] > 0
