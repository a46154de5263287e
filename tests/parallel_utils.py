"""Scripts that run split engines in a subprocess of their own (their ranks are spawned from it), each engine of
a layout (``tensor_parallel_size``, ``pipeline_parallel_size``) replacing the one before's ranks."""
from __future__ import annotations

import json
import subprocess
import sys

# The greedy tokens of each layout on the same prompts, rank 0's weight bytes, and the most steps of decodes in
# flight at once for short prompts that arrive together (long prompts' chunks fill the stages at any rate).
TOKENS = """
import json, sys
from kvserve import LLM, SamplingParams
path, layouts, options = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
prompts = [[5, 17, 42, 99, 3] * 6, [7, 8, 9] * 9 + [11], list(range(20, 44)) * 2, list(range(100, 140))]
params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
for layout in layouts:
    llm = LLM(path, max_num_batched_tokens=16, max_num_seqs=4, **layout, **options)
    engine, in_flight = llm.llm_engine, set()
    submit = engine.runner.submit

    def counting_submit(batch):
        if batch.num_decodes == len(batch.seqs):
            in_flight.add(len(engine.in_flight) + 1)
        submit(batch)
    engine.runner.submit = counting_submit
    outputs = llm.generate(prompts, params, use_tqdm=False)
    in_flight.clear()
    llm.generate([[3 + i, 9, 27] for i in range(4)], params, use_tqdm=False)
    print(json.dumps(dict(layout=layout, tokens=[o.outputs[0].token_ids for o in outputs],
                          bytes=engine.runner.built.weight_bytes, in_flight=max(in_flight))))
"""

# Seeded parallel sampling with logprobs and prompt logprobs, beam search, penalties and a regex constraint, for
# each layout.
FEATURES = """
import json, sys
from kvserve import LLM, BeamSearchParams, SamplingParams, StructuredOutputsParams
path, layouts, options = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
prompts = [[5, 17, 42, 99, 3] * 6, list(range(100, 140))]
for layout in layouts:
    llm = LLM(path, dtype="float32", kv_cache_memory="16MiB", **layout, **options)
    sampled = llm.generate(prompts, SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=12, logprobs=2,
                                                   prompt_logprobs=1), use_tqdm=False)
    beams = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True))
    penalized = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                     repetition_penalty=1.2), use_tqdm=False)
    constrained = llm.generate(prompts, SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=16,
        structured_outputs=StructuredOutputsParams(regex="[a-e]{3,9}!")), use_tqdm=False)
    print(json.dumps(dict(sampled=[[c.token_ids for c in o.outputs] for o in sampled],
                          logprobs=[e[t].logprob for o in sampled for c in o.outputs
                                    for t, e in zip(c.token_ids, c.logprobs)],
                          prompt_logprobs=[next(iter(e.values())).logprob for o in sampled
                                           for e in o.prompt_logprobs[1:]],
                          beams=[[s.tokens for s in o.sequences] for o in beams],
                          penalized=[o.outputs[0].token_ids for o in penalized],
                          constrained=[c.text for o in constrained for c in o.outputs])))
"""

# Rank 1 killed half a second into a long generation: how that generation, and the next, end.
KILL = """
import json, os, signal, sys, threading, time
from kvserve import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory="16MiB", **json.loads(sys.argv[2]))
pid = llm.llm_engine.runner.ranks.pids[0]
threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
started = time.monotonic()
for attempt in ("in flight", "after"):
    try:
        # 64 requests of 500 tokens take far longer than the half second before the kill.
        llm.generate([[5, 6, 7]] * 64, SamplingParams(max_tokens=500 if attempt == "in flight" else 4,
                                                      ignore_eos=True), use_tqdm=False)
        print(attempt, "finished")
    except Exception as exc:
        print(attempt, type(exc).__name__, round(time.monotonic() - started, 1), exc)
"""


def run_script(script: str, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def run_layouts(script: str, path: str, layouts: list[dict], **options) -> list[dict]:
    lines = run_script(script, path, json.dumps(layouts), json.dumps(options))
    return [json.loads(line) for line in lines if line.startswith("{")]
