"""Preemption by swapping: a victim's blocks go to host memory and come back, and every output is the same as
without preemption. The CPU platform keeps its cache in host memory already, so the toy platform (a real
out-of-tree plugin, standing in for a device with memory of its own) runs it."""
from __future__ import annotations

import json

import pytest
from conftest import run_python

pytestmark = pytest.mark.slow

RUN = """
import json, sys
from kvserve import LLM, BeamSearchParams, SamplingParams
from kvserve_toy_platform.plugin import CALLS
options = json.loads(sys.argv[2])
llm = LLM(model=sys.argv[1], device="toy", dtype="float32", max_model_len=96, max_num_batched_tokens=96,
          max_num_seqs=8, **options)
prompts = [[(7 * i + j) % 380 + 3 for j in range(20 + 9 * i)] for i in range(5)]
greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
sampled = llm.generate(prompts[:2], SamplingParams(n=3, seed=5, max_tokens=40, ignore_eos=True), use_tqdm=False)
beams = llm.beam_search(prompts[:2], BeamSearchParams(beam_width=3, max_tokens=30, ignore_eos=True))
engine = llm.llm_engine
print(json.dumps(dict(greedy=[o.outputs[0].token_ids for o in greedy],
                      sampled=[[c.token_ids for c in o.outputs] for o in sampled],
                      beams=[[s.tokens for s in o.sequences] for o in beams],
                      preemptions=engine.scheduler.num_preemptions, swap_outs=engine.scheduler.num_swap_outs,
                      free=engine.block_manager.num_free_blocks == engine.block_manager.num_blocks,
                      host_free=len(engine.block_manager.free_host_blocks), copies=CALLS["copy_blocks"])))
"""
ROOMY = dict(kv_cache_memory="32MiB")
TIGHT = dict(num_gpu_blocks_override=8, enable_prefix_caching=False)


def run(plugin_site, model: str, **options) -> dict:
    return json.loads(run_python(plugin_site, ["-c", RUN, model, json.dumps(options)]).splitlines()[-1])


@pytest.fixture(scope="module")
def roomy(plugin_site, tiny_model) -> dict:
    return run(plugin_site, tiny_model("llama-tied-gqa"), **ROOMY)


@pytest.mark.parametrize("options", [dict(TIGHT, preemption_mode="swap", swap_space="2MiB"),
                                     dict(TIGHT, preemption_mode="swap", swap_space="2MiB", enable_prefix_caching=True),
                                     dict(TIGHT, preemption_mode="swap", swap_space=0),
                                     dict(TIGHT, preemption_mode="recompute")],
                         ids=["swap", "swap-prefix-cached", "no-host-room", "recompute"])
def test_preempted_outputs_equal_unpreempted(plugin_site, tiny_model, roomy, options):
    result = run(plugin_site, tiny_model("llama-tied-gqa"), **options)
    for key in ("greedy", "sampled", "beams"):
        assert result[key] == roomy[key], key
    assert roomy["preemptions"] == 0 and result["preemptions"] > 0 and result["free"]
    swapping = options["preemption_mode"] == "swap" and options["swap_space"] != 0
    assert (result["swap_outs"] > 0) == swapping
    if swapping:   # every host block is back, and the copies went through the platform's backend
        assert result["host_free"] == 2 * 2**20 // (2 * 16 * 2 * 16 * 2 * 4) and result["copies"] > 0
