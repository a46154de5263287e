"""Pipeline parallelism over processes on this machine (gloo): layers split over stages, alone and with tensor
parallelism in each stage, give the same greedy tokens as one process, with several steps in flight and each
rank holding its stage's share of the weights; a rank that dies stops the engine at once; what does not split
is a clear error before any process starts; split engines start from a script on standard input."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest
from parallel_utils import FEATURES, KILL, TOKENS, run_layouts, run_script
from server_utils import kill_mid_stream, openai_client, start_server, stop_server, tiny_args
from test_tensor_parallel import rank_processes

from kvserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

TINY = dict(dtype="float32", kv_cache_memory="16MiB")


# The tiny models have 2 layers and 4 query heads; ranks of a stage split its layer's heads.
@pytest.mark.parametrize("arch, layout, share", [
    ("llama-tied-gqa", dict(pipeline_parallel_size=2), 0.5), ("llama-untied-llama3-rope", dict(
        pipeline_parallel_size=2), 0.5), ("qwen2", dict(pipeline_parallel_size=2), 0.5),
    ("mixtral", dict(pipeline_parallel_size=2), 0.5),
    ("llama-tied-gqa", dict(pipeline_parallel_size=2, tensor_parallel_size=2), 0.25),
    ("qwen2", dict(pipeline_parallel_size=2, tensor_parallel_size=2), 0.25)])
def test_stages_give_the_tokens_of_one(tiny_model, arch, layout, share):
    one, split = run_layouts(TOKENS, tiny_model(arch), [{}, layout], **TINY)
    assert split["tokens"] == one["tokens"]
    assert one["in_flight"] == 1 and split["in_flight"] == layout["pipeline_parallel_size"]
    # Besides its layers, the first stage holds the embedding (as the last does when the head is tied to it).
    assert 0.9 * share < split["bytes"] / one["bytes"] < 1.3 * share


def test_smollm2_over_two_stages(smollm2_path):
    # float32: in bfloat16 the rows of a call choose between the CPU's AMX and AVX512 kernels, whose sums round
    # apart (docs/cpu.md), and stages batch rows differently.
    one, two = run_layouts(TOKENS, smollm2_path, [{}, dict(pipeline_parallel_size=2)], dtype="float32",
                           kv_cache_memory="64MiB", max_model_len=512)
    assert two["tokens"] == one["tokens"]
    assert 0.5 < two["bytes"] / one["bytes"] < 0.65   # 15 of 30 layers, and the 28M-parameter embedding


def test_stages_serve_every_sampling_feature_alike(tiny_model):
    one, two = run_layouts(FEATURES, tiny_model("llama-tied-gqa"), [{}, dict(pipeline_parallel_size=2)])
    for name in ("logprobs", "prompt_logprobs"):
        assert two.pop(name) == pytest.approx(one.pop(name), abs=1e-4)
    assert two == one


# Spawned ranks do not run the script that built the engine again: ``python -`` has none to run (its main
# module's __file__ is '<stdin>'), and a script without an `if __name__ == "__main__":` guard (TOKENS has none)
# would build its engine again in each rank.
@pytest.mark.parametrize("via", ["stdin", "a script without a main guard"])
def test_split_engines_start_from_stdin_or_an_unguarded_script(tiny_model, tmp_path, via):
    layouts = [{}, dict(pipeline_parallel_size=2), dict(tensor_parallel_size=2)]
    args = [tiny_model("llama-tied-gqa"), json.dumps(layouts), json.dumps(TINY)]
    if via == "stdin":
        command, script = [sys.executable, "-"], TOKENS
    else:
        (path := tmp_path / "split.py").write_text(TOKENS)
        command, script = [sys.executable, str(path)], None
    result = subprocess.run([*command, *args], input=script, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, stages, ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert stages["tokens"] == one["tokens"] and ranks["tokens"] == one["tokens"]


@pytest.mark.parametrize("options, words", [
    (dict(pipeline_parallel_size=3), "pipeline_parallel_size=3 exceeds the 2 decoder layers of .*: every stage "
     "needs one; allowed: 1..2"),
    (dict(pipeline_parallel_size=2, speculative_config={"method": "ngram", "num_speculative_tokens": 2}),
     "pipeline_parallel_size=2: speculative decoding \\('ngram'\\) does not run over pipeline stages yet"),
    (dict(pipeline_parallel_size=2, tensor_parallel_size=3), "tensor_parallel_size=3 cannot split"),
])
def test_what_does_not_split_into_stages_is_a_clear_error(tiny_model, options, words):
    with pytest.raises(ValueError, match=words):
        LLM(tiny_model("llama-tied-gqa"), **TINY, **options)


@pytest.mark.parametrize("layout", [dict(pipeline_parallel_size=2), dict(pipeline_parallel_size=2,
                                                                         tensor_parallel_size=2)])
def test_a_stage_that_dies_stops_the_engine_with_a_clear_error(tiny_model, layout):
    in_flight, after = run_script(KILL, tiny_model("llama-tied-gqa"), json.dumps(layout))
    words = "RankFailure .* rank 1 \\(process \\d+\\) ended with exit code -9"
    assert re.fullmatch(f"in flight {words}.*", in_flight) and float(in_flight.split()[3]) < 10
    assert re.fullmatch(f"after {words}.*", after)


def test_the_server_splits_into_stages_and_reports_a_dead_one(tiny_model):
    server = start_server(tiny_args(tiny_model, "--pipeline-parallel-size", "2"))
    try:
        client = openai_client(server, timeout=60)
        model = tiny_model("llama-tied-gqa")
        assert "pipeline stage 1 of 2 (ranks 1-1, gloo): decoder layers [1, 2), the final norm and the output " \
               "head" in server.output()
        completion = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=16,
                                               temperature=0, extra_body={"ignore_eos": True})
        expected = LLM(model, dtype="float32", kv_cache_memory="8MiB").generate(
            "The quick brown fox", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
        assert completion.choices[0].text == expected[0].outputs[0].text
        (last_stage,) = rank_processes(server.proc.pid)
        kill_mid_stream(client, model, last_stage)
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{server.url}/health", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline, "/health still says 200 with a stage dead"
            time.sleep(0.1)
        assert health.status_code == 503 and "rank 1 (process" in health.text
        with pytest.raises(openai.APIStatusError, match="rank 1 \\(process"):
            client.completions.create(model=model, prompt="Hi", max_tokens=4)
    finally:
        stop_server(server)
