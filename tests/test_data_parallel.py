"""Data parallelism: replicas, each a whole engine in a process of its own (tensor-parallel itself or not), give
the greedy tokens of one engine; the front balances requests by load and by prompt prefix, rejects bad input
before any replica sees it, sums the replicas' counters in /metrics, fails only the requests of a replica's failed
step, and stops with a clear error when a replica's process ends."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest
from server_utils import (kill_mid_stream, metrics, openai_client, start_server, stop_server, tiny_args,
                          wait_until)

from kvserve import LLM, SamplingParams
from kvserve.core.engine.llm_engine import FAULT_TOKEN_ENV

pytestmark = pytest.mark.slow

# Each layout in one process, for a model: the tokens (free, then under a regex that each replica compiles while
# its other requests run), and how many requests each replica was sent.
RUN = """
import json, sys
from kvserve import LLM, SamplingParams, StructuredOutputsParams
path, layouts = sys.argv[1], json.loads(sys.argv[2])
prompts = [[5, 17, 42, 99, 3] * 6, [7, 8, 9] * 9 + [11], list(range(20, 44)) * 2, list(range(100, 140)),
           [11, 12] * 10, list(range(200, 260)), [3] * 17, list(range(300, 320))]
params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
for layout in layouts:
    llm = LLM(path, dtype="float32", kv_cache_memory="16MiB", max_num_seqs=4, **layout)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    router = getattr(llm.llm_engine, "router", None)
    served = router and list(router.served)
    regex = StructuredOutputsParams(regex="[a-e]{3,9}!")
    constrained = llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=16, structured_outputs=regex),
                               use_tqdm=False)
    print(json.dumps(dict(tokens=[o.outputs[0].token_ids for o in outputs], served=served,
                          constrained=[o.outputs[0].text for o in constrained])))
"""


def run(script: str, *args: str) -> list[str]:
    """The lines a script printed (its ``sys.argv[1:]`` being ``args``)."""
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def outcomes(script: str, *args: str) -> list[dict]:
    return [json.loads(line) for line in run(script, *args) if line.startswith("{")]


@pytest.mark.parametrize("arch, layouts", [
    ("llama-tied-gqa", [dict(data_parallel_size=2), dict(data_parallel_size=2, tensor_parallel_size=2)]),
    ("qwen2", [dict(data_parallel_size=2)])])
def test_replicas_give_the_tokens_of_one_engine(tiny_model, arch, layouts):
    one, *replicated = outcomes(RUN, tiny_model(arch), json.dumps([{}, *layouts]))
    assert all(re.fullmatch("[a-e]{3,9}!", text) for text in one["constrained"]), one["constrained"]
    for layout, outcome in zip(layouts, replicated):
        assert outcome["tokens"] == one["tokens"] and outcome["constrained"] == one["constrained"], layout
        assert outcome["served"] == [4, 4], layout   # 8 requests at once: each replica serves half


def test_replicas_start_from_a_script_on_stdin(tiny_model):
    # A replica does not run the script that built the engine again: `python -` has none to run.
    result = subprocess.run([sys.executable, "-", tiny_model("llama-tied-gqa"), json.dumps([{}, dict(
        data_parallel_size=2)])], input=RUN, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, replicated = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert replicated["tokens"] == one["tokens"] and replicated["served"] == [4, 4]


ROUTING = """
import json, sys
from kvserve import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory="16MiB", max_model_len=128, data_parallel_size=2)
engine, params = llm.llm_engine, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
rejected = []
for attempt in (lambda: llm.generate([[5, 6, 7], [9] * 128], params, use_tqdm=False),
                lambda: engine.add_request("bad", [5, 384], params)):
    try:
        attempt()
    except ValueError as exc:
        rejected.append(str(exc))
untouched = dict(served=list(engine.router.served), unfinished=engine.has_unfinished_requests())
shared = list(range(100, 164))   # 4 blocks of 16 tokens
prompts = dict(U1=[1, 2, 3], S1=shared + [7], S2=shared + [8, 9], U2=[4, 5, 6], S3=shared + [10], U3=[7, 8],
               U4=[9, 10], **{f"T{i}": shared + [20 + i] for i in range(5)})
for request_id, prompt in prompts.items():
    engine.add_request(request_id, prompt, params)
routes = dict(engine.replica_of)
finished = set()
while engine.has_unfinished_requests():
    finished.update(o.request_id for o in engine.step() if o.finished)
print(json.dumps(dict(rejected=rejected, untouched=untouched, routes=routes, finished=sorted(finished),
                      served=engine.router.served, prompt_tokens=engine.stats().prompt_tokens)))
"""


def test_the_front_rejects_bad_input_and_routes_by_load_and_prefix(tiny_model):
    (outcome,) = outcomes(ROUTING, tiny_model("llama-tied-gqa"))
    too_long, out_of_vocabulary = outcome["rejected"]
    assert "prompt has 128 tokens, but max_model_len is 128" in too_long
    assert "prompt token ids must be integers in [0, 384)" in out_of_vocabulary
    assert outcome["untouched"] == dict(served=[0, 0], unfinished=False)   # no replica was sent anything
    routes = outcome["routes"]
    assert sorted(outcome["finished"]) == sorted(routes)
    # The prompts sharing 4 blocks go where the first went while its load stays within the slack (least + 2)...
    assert len({routes[i] for i in ("S1", "S2", "S3", "T0", "T1", "T2", "T3")}) == 1
    # ... the unrelated ones balance the load around them, and the burst's last, 3 above the least, goes elsewhere.
    assert {routes[i] for i in ("U1", "U2", "U3", "U4")} == {1 - routes["S1"]}
    assert routes["T4"] != routes["S1"] and sorted(outcome["served"]) == [5, 7]
    assert outcome["prompt_tokens"] > 0


KILL = """
import os, signal, sys, time
from kvserve import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory="16MiB", data_parallel_size=2)
engine, params = llm.llm_engine, SamplingParams(max_tokens=500, ignore_eos=True)
for request_id in "abcdefgh":
    engine.add_request(request_id, [5, 6, 7], params)
generating = set()
while len(generating) < 8:   # every request, on both replicas, has tokens
    generating.update(o.request_id for o in engine.step())
os.kill(engine.replicas.replicas[1].process.pid, signal.SIGKILL)
killed = time.monotonic()
for attempt in ("in flight", "after"):
    try:
        while attempt == "in flight":
            engine.step()
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
    except Exception as exc:
        print(attempt, type(exc).__name__, round(time.monotonic() - killed, 1), exc)
"""


def test_a_replica_that_dies_stops_the_engine_with_a_clear_error(tiny_model):
    in_flight, after = run(KILL, tiny_model("llama-tied-gqa"))
    words = "DataParallelFailure [\\d.]+ data-parallel replica 1 \\(process \\d+\\) ended with exit code -9"
    assert re.fullmatch(f"in flight {words}", in_flight) and float(in_flight.split()[3]) < 5
    assert re.fullmatch(f"after {words}", after)


FAULT = """
import json, sys
from kvserve import LLM, SamplingParams
from kvserve.core.engine.llm_engine import EngineStepError
llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory="16MiB", data_parallel_size=2)
params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
try:
    llm.generate([[5, 6, 300]], params, use_tqdm=False)
except EngineStepError as exc:
    failed = dict(request_ids=exc.request_ids, message=str(exc))
outputs = llm.generate([[5, 6, 7]] * 4, params, use_tqdm=False)
print(json.dumps(dict(failed=failed, tokens=[o.outputs[0].token_ids for o in outputs])))
"""


def test_a_failed_step_in_a_replica_fails_its_requests_and_the_engine_goes_on(tiny_model, monkeypatch):
    monkeypatch.setenv(FAULT_TOKEN_ENV, "300")   # a step that computes token 300 raises, as a broken device would
    (outcome,) = outcomes(FAULT, tiny_model("llama-tied-gqa"))
    assert outcome["failed"]["request_ids"] == ["0"] and "injected fault: token 300" in outcome["failed"]["message"]
    assert len(outcome["tokens"]) == 4 and all(len(t) == 4 for t in outcome["tokens"])


@pytest.fixture(scope="module")
def server(tiny_model):
    server = start_server(tiny_args(tiny_model, "-dp", "2"))
    yield server
    stop_server(server)


def test_a_server_over_two_replicas_answers_as_one_engine(server, tiny_model):
    path = tiny_model("llama-tied-gqa")
    assert re.search("data parallelism over 2 replicas: replica 0 in process \\d+, replica 1", server.output())
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB")
    client = openai_client(server)
    prompts = ["The quick brown fox", "Once upon a time", "Paged attention", "Continuous batching", "A tiny model",
               "The lazy dog"]
    # One at a time: each goes to the replica sent fewer, so both serve.
    replies = [client.completions.create(model=path, prompt=prompt, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True}) for prompt in prompts]
    expected = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [r.choices[0].text for r in replies] == [o.outputs[0].text for o in expected]
    counts = metrics(server)
    assert counts["kvserve:generation_tokens_total"] == sum(r.usage.completion_tokens for r in replies) == 72
    assert counts["kvserve:prompt_tokens_total"] == sum(r.usage.prompt_tokens for r in replies)
    assert counts["kvserve:kv_cache_free_blocks"] == 2 * llm.llm_engine.block_manager.num_blocks
    assert counts["kvserve:num_requests_running"] == 0


def test_the_server_reports_a_dead_replica(server, tiny_model):
    """Last of the server's tests: it leaves the server's engine stopped."""
    client = openai_client(server, timeout=60)
    pid = int(re.search("replica 0 in process (\\d+)", server.output()).group(1))
    kill_mid_stream(client, tiny_model("llama-tied-gqa"), pid)
    started = time.monotonic()
    health = wait_until(lambda: (h := httpx.get(f"{server.url}/health", timeout=10)).status_code != 200 and h, 10)
    assert health and time.monotonic() - started < 10, "/health still says 200 with a replica dead"
    assert health.status_code == 503 and f"data-parallel replica 0 (process {pid}) ended" in health.text
    with pytest.raises(openai.APIStatusError, match="data-parallel replica 0"):
        client.completions.create(model=tiny_model("llama-tied-gqa"), prompt="Hi", max_tokens=4)
