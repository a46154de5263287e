"""Tensor parallelism over processes on this machine (gloo): the same greedy tokens as one process, each rank
holding about 1/N of the weights; sizes a model cannot be split by, and features that do not split yet, are
clear errors before any process starts."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from parallel_utils import FEATURES, KILL, TOKENS, run_layouts, run_script
from server_utils import kill_mid_stream, openai_client, start_server, stop_server, tiny_args

from kvserve import LLM
from kvserve.core.layers.ops import Ops
from kvserve.core.loader.weights import load_weights
from kvserve.core.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.slow

# Over 4 ranks, llama-tied-gqa's 2 key-value heads are each copied to the 2 ranks whose query heads use it. The
# mixtures of experts split every expert's columns, or with expert parallelism the experts.
@pytest.mark.parametrize("arch, size, options", [
    ("llama-tied-gqa", 2, {}), ("llama-untied-llama3-rope", 2, {}), ("qwen2", 2, {}), ("llama-tied-gqa", 4, {}),
    ("mixtral", 2, {}), ("mixtral", 2, dict(enable_expert_parallel=True)), ("qwen2-moe", 2, {}),
    ("qwen2-moe", 2, dict(enable_expert_parallel=True))])
def test_ranks_give_the_tokens_of_one(tiny_model, arch, size, options):
    one, split = run_layouts(TOKENS, tiny_model(arch), [{}, dict(tensor_parallel_size=size)], dtype="float32",
                             kv_cache_memory="16MiB", **options)
    assert split["tokens"] == one["tokens"]
    assert 0.9 / size < split["bytes"] / one["bytes"] < 1.2 / size


def test_smollm2_over_three_ranks(smollm2_path):
    # float32: in bfloat16 the rows of a call choose between the CPU's AMX and AVX512 kernels, whose sums round
    # apart (docs/cpu.md).
    one, three = run_layouts(TOKENS, smollm2_path, [{}, dict(tensor_parallel_size=3)], dtype="float32",
                             kv_cache_memory="64MiB", max_model_len=512)
    assert three["tokens"] == one["tokens"]
    assert 0.3 < three["bytes"] / one["bytes"] < 0.37


@pytest.mark.parametrize("arch, options, words", [
    ("llama-tied-gqa", dict(tensor_parallel_size=3), "tensor_parallel_size=3 cannot split .* \\(4 query heads, 128 "
     "intermediate size, 2 key-value heads\\).* sizes that fit: 1, 2, 4"),
    ("qwen2-moe", dict(tensor_parallel_size=3, enable_expert_parallel=True), "\\(4 query heads, 128 intermediate "
     "size, 48 shared expert intermediate size, 4 experts, 2 key-value heads\\).* sizes that fit: 1, 2, 4"),
    ("llama-tied-gqa", dict(tensor_parallel_size=2, speculative_config={
        "method": "draft_model", "model": "DRAFT", "num_speculative_tokens": 2}),
     "speculative method 'draft_model' does not split over ranks yet"),
])
def test_what_does_not_split_is_a_clear_error(tiny_model, arch, options, words):
    if "speculative_config" in options:
        options["speculative_config"]["model"] = tiny_model("llama-draft")
    with pytest.raises(ValueError, match=words):
        LLM(tiny_model(arch), dtype="float32", kv_cache_memory="16MiB", **options)


def test_smollm2_cannot_split_its_nine_heads_in_two(smollm2_path):
    with pytest.raises(ValueError, match="9 query heads, 1536 intermediate size, 3 key-value heads.* sizes that fit: "
                                         "1, 3"):
        LLM(smollm2_path, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="quantized checkpoints \\(gguf\\) do not split over ranks yet"):
        LLM(smollm2_path, tensor_parallel_size=3, quantization="gguf")


def test_the_command_line_splits_the_model_too(tiny_model):
    def generate(*options: str) -> str:
        result = subprocess.run(["kvserve", "generate", "The quick brown fox", "--max-tokens", "16", "--model",
                                 tiny_model("llama-tied-gqa"), "--dtype", "float32", "--kv-cache-memory", "8MiB",
                                 *options], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    split = generate("--tensor-parallel-size", "2")
    assert split.stdout == generate().stdout
    assert "tensor parallelism over 2 ranks" in split.stderr


def test_a_rank_that_dies_stops_the_engine_with_a_clear_error(tiny_model):
    in_flight, after = run_script(KILL, tiny_model("llama-tied-gqa"), json.dumps(dict(tensor_parallel_size=2)))
    words = "RankFailure .* rank 1 \\(process \\d+\\) ended with exit code -9"
    assert re.fullmatch(f"in flight {words}.*", in_flight) and float(in_flight.split()[3]) < 10
    assert re.fullmatch(f"after {words}.*", after)


def rank_processes(pid: int) -> list[int]:
    """The processes multiprocessing spawned from ``pid`` (its resource tracker aside)."""
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    return [int(child) for child in children if "spawn_main" in open(f"/proc/{child}/cmdline").read()]


@pytest.mark.parametrize("when", ["in flight", "idle"])
def test_the_server_reports_a_dead_rank(tiny_model, when):
    server = start_server(tiny_args(tiny_model, "--tensor-parallel-size", "2"))
    try:
        client = openai_client(server, timeout=60)
        (worker,) = rank_processes(server.proc.pid)
        if when == "in flight":
            kill_mid_stream(client, tiny_model("llama-tied-gqa"), worker)
        else:
            os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10   # the engine notices at once; the poll allows for a loaded machine
        while (health := httpx.get(f"{server.url}/health", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline, "/health still says 200 with a rank dead"
            time.sleep(0.1)
        assert health.status_code == 503 and "rank 1 (process" in health.text
        with pytest.raises(openai.APIStatusError, match="rank 1 \\(process"):
            client.completions.create(model=tiny_model("llama-tied-gqa"), prompt="Hi", max_tokens=4)
    finally:
        stop_server(server)


STARTUP_DEATH = """
import os, signal, sys, threading, time
from kvserve import LLM

def kill_the_first_rank():
    # The spawned rank, once it runs its own command line: a child not yet exec'd still shows this script's, and
    # multiprocessing's resource tracker is a child too.
    while True:
        for child in open(f"/proc/{os.getpid()}/task/{threading.main_thread().native_id}/children").read().split():
            if any(arg.startswith("from multiprocessing.spawn import spawn_main")
                   for arg in open(f"/proc/{child}/cmdline").read().split("\\0")):
                os.kill(int(child), signal.SIGKILL)
                return
        time.sleep(0.01)

threading.Thread(target=kill_the_first_rank, daemon=True).start()
started = time.monotonic()
try:
    LLM(sys.argv[1], dtype="float32", kv_cache_memory="16MiB", tensor_parallel_size=2)
except Exception as exc:
    print(type(exc).__name__, round(time.monotonic() - started, 1), exc)
"""


def test_a_rank_that_dies_at_start_up_fails_the_start_at_once(tiny_model):
    result = subprocess.run([sys.executable, "-c", STARTUP_DEATH, tiny_model("llama-tied-gqa")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    name, seconds, message = result.stdout.strip().split(" ", 2)
    assert name == "RankFailure" and float(seconds) < 30
    assert re.match("rank 1 \\(process \\d+\\) ended with exit code -9", message)


RAY = """
import json, os, signal, sys, time
from kvserve import LLM, SamplingParams
prompts = [[5, 17, 42, 99, 3] * 6, list(range(100, 140))]
params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
tokens = {}
for backend in ("mp", "ray"):
    llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory="16MiB", tensor_parallel_size=2,
              distributed_executor_backend=backend)
    tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
os.kill(llm.llm_engine.runner.ranks.pids[0], signal.SIGKILL)   # the Ray actor's process
deadline = time.monotonic() + 20
while llm.llm_engine.failure is None and time.monotonic() < deadline:
    time.sleep(0.1)
print(json.dumps(dict(tokens=tokens, failure=str(llm.llm_engine.failure))))
"""


def test_ray_actors_give_the_tokens_of_processes(tiny_model):
    pytest.importorskip("ray")
    result = subprocess.run([sys.executable, "-c", RAY, tiny_model("llama-tied-gqa")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["tokens"]["ray"] == outcome["tokens"]["mp"]
    assert re.match("rank 1 \\(Ray actor, process \\d+\\) failed: ActorDiedError", outcome["failure"])


def test_split_ranks_serve_every_sampling_feature_alike(tiny_model):
    """Seeded parallel sampling with logprobs and prompt logprobs, beam search, penalties, a constraint, n-gram
    speculation."""
    # The last, in the process the split one ran in, with layers of its own again.
    layouts = [dict(tensor_parallel_size=1), dict(tensor_parallel_size=2), dict(tensor_parallel_size=1)]
    one, two, again = run_layouts(FEATURES, tiny_model("llama-tied-gqa"), layouts,
                                  speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert again == one
    for name in ("logprobs", "prompt_logprobs"):   # summed over ranks in another order: equal to float32's rounding
        assert two.pop(name) == pytest.approx(one.pop(name), abs=1e-4)
    assert two == one
    assert all(re.fullmatch("[a-e]{3,9}!", text) for text in one["constrained"]), one["constrained"]


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_a_vocabulary_tensor_of_another_width_is_a_clear_error(hf_model, name):
    hf = hf_model("llama-untied-llama3-rope")
    model = LlamaForCausalLM(hf.config, Ops())
    weights = {key: value.detach() for key, value in hf.state_dict().items()}
    weights[name] = torch.zeros(hf.config.vocab_size, hf.config.hidden_size + 1)
    with pytest.raises(ValueError, match="has shape \\(384, 65\\), the model expects \\(384, 64\\)"):
        load_weights(model, weights.items())
