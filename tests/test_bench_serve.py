"""`kvserve bench serve` run as a user runs it, against a real server on a tiny model."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from server_utils import openai_client, start_server, stop_server

from kvserve.core.bench.report import percentiles
from kvserve.core.bench.serving import arrival_times
from kvserve.core.bench.throughput import random_workload

pytestmark = pytest.mark.slow

LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
FIELDS = {"model", "num_prompts", "request_rate", "completed", "failed", "duration_s", "total_input_tokens",
          "total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput", "errors",
          *LATENCIES}


@pytest.fixture(scope="module")
def server(tiny_model):
    # The workload draws token ids up to 30000: a tiny model with that vocabulary.
    server = start_server([tiny_model("qwen2-big-vocab"), "--dtype", "float32", "--kv-cache-memory", "16MiB"])
    yield server
    stop_server(server)


def bench_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["kvserve", "bench", "serve", "--disable-tqdm", *args], capture_output=True, text=True,
                          timeout=120)


def test_serve_reports_latencies_and_goodput(server, tmp_path):
    path = tmp_path / "serve.json"
    result = bench_serve("--base-url", server.url, "--num-prompts", "5", "--input-len", "8:16", "--output-len", "6",
                         "--request-rate", "20", "--max-concurrency", "4", "--goodput", "ttft:60000", "tpot:60000",
                         "e2el:60000", "--output-json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(path.read_text())
    assert FIELDS | {"request_goodput", "goodput_slo_ms"} <= report.keys(), report
    assert "request_goodput:" in result.stdout and "ttft_ms" in result.stdout
    assert report["completed"] == 5 and report["failed"] == 0 and report["errors"] == []
    assert report["total_output_tokens"] == 5 * 6
    assert report["total_input_tokens"] == sum(map(len, random_workload(5, (8, 16), 0)))
    assert report["request_rate"] == 20 and report["goodput_slo_ms"] == {"ttft": 60000, "tpot": 60000, "e2el": 60000}
    assert report["request_goodput"] == report["request_throughput"] > 0   # every request meets a minute
    assert report["output_throughput"] > 0 and report["total_token_throughput"] > report["output_throughput"]
    for name in LATENCIES:
        assert set(report[name]) == {"mean", "median", "p50", "p90", "p99"}
    # Every token streams a chunk, even one the tiny tokenizer decodes to no text, so every gap is measured.
    for name in ("ttft_ms", "itl_ms", "e2el_ms"):
        stats = report[name]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] and stats["median"] == stats["p50"]
    assert report["e2el_ms"]["mean"] >= report["ttft_ms"]["mean"] and report["tpot_ms"]["mean"] > 0


def test_every_token_streams_a_chunk(server):
    # Most of the model's 30000 ids decode to no text with the tiny tokenizer; vLLM still sends their chunks.
    with openai_client(server) as client:
        stream = client.completions.create(model=client.models.list().data[0].id, prompt=[5, 6, 7], max_tokens=5,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
    assert len(chunks) == 5 and [c.finish_reason for c in chunks] == [None] * 4 + ["length"]


def test_goodput_counts_only_requests_within_the_slos(server, tmp_path):
    path = tmp_path / "serve.json"
    result = bench_serve("--base-url", server.url, "--num-prompts", "2", "--input-len", "8", "--output-len", "2",
                         "--goodput", "e2el:0.001", "--metric-percentiles", "25,75", "--output-json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(path.read_text())
    assert report["completed"] == 2 and report["request_rate"] == "inf"
    assert report["request_goodput"] == 0 and report["request_throughput"] > 0
    assert set(report["ttft_ms"]) == {"mean", "median", "p25", "p75"}


def test_failed_requests_are_counted_with_their_errors(server, tmp_path):
    path = tmp_path / "serve.json"
    result = bench_serve("--base-url", server.url, "--model", "no-such-model", "--num-prompts", "3",
                         "--input-len", "8", "--output-len", "2", "--output-json", str(path))
    assert result.returncode == 1, result.stdout + result.stderr   # nothing completed
    report = json.loads(path.read_text())
    assert report["completed"] == 0 and report["failed"] == 3 and report["total_output_tokens"] == 0
    assert len(report["errors"]) == 3 and all("404" in e and "no-such-model" in e for e in report["errors"])
    assert report["ttft_ms"]["p50"] is None and "no-such-model" in result.stdout


@pytest.mark.parametrize("slo, complaint", [("latency:500", "ttft, tpot, e2el"), ("ttft", "ttft, tpot, e2el"),
                                            ("ttft:fast", "'fast'"), ("tpot:-5", "> 0")])
def test_bad_goodput_is_a_clear_error(slo, complaint):
    # Checked before any request: no server needed.
    result = bench_serve("--base-url", "http://127.0.0.1:9", "--goodput", "ttft:500", slo)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("option, value", [("--request-rate", "0"), ("--metric-percentiles", "50,101"),
                                           ("--input-len", "9:3"), ("--max-concurrency", "0")])
def test_bad_options_are_clear_errors(option, value):
    result = bench_serve("--base-url", "http://127.0.0.1:9", option, value)
    assert result.returncode == 2 and result.stderr.startswith("error:") and value in result.stderr, result.stderr


def test_unreachable_server_is_a_clear_error():
    result = bench_serve("--base-url", "http://127.0.0.1:9", "--num-prompts", "1", "--ready-timeout", "1")
    assert result.returncode == 2 and "--base-url" in result.stderr and "Traceback" not in result.stderr


def test_percentiles_in_milliseconds():
    assert percentiles([0.001, 0.002, 0.003], (50, 99.5)) == {"mean": 2.0, "median": 2.0, "p50": 2.0, "p99.5": 2.99}
    assert percentiles([], (90,)) == {"mean": None, "median": None, "p90": None}


def test_poisson_arrivals_are_seeded():
    times = arrival_times(2000, 50.0, seed=3)
    assert times == arrival_times(2000, 50.0, seed=3) != arrival_times(2000, 50.0, seed=4)
    gaps = np.diff(times)
    assert times[0] == 0 and (gaps > 0).all() and abs(gaps.mean() - 1 / 50) < 0.002
    assert arrival_times(3, float("inf"), seed=0) == [0.0, 0.0, 0.0]
