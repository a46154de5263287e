"""GPT-NeoX and Falcon: greedy outputs token-identical to transformers' in float32, prefilling in chunks beside
decodes, and alone equal to split over ranks or stages; ALiBi, not supported, is a clear error."""
from __future__ import annotations

import json
import shutil

import pytest
from parallel_utils import TOKENS, run_layouts

from kvserve import LLM, SamplingParams
from kvserve.conformance.tiny_model import hf_greedy
from kvserve.core.models.falcon import FalconForCausalLM
from kvserve.core.models.gpt_neox import GPTNeoXForCausalLM

pytestmark = pytest.mark.slow

PROMPTS = [list(range(5, 60)), [7, 8, 9] * 9 + [11], [42], list(range(300, 340))]
NATIVE = {"gpt-neox": GPTNeoXForCausalLM, "gpt-neox-sequential": GPTNeoXForCausalLM, "falcon-gqa": FalconForCausalLM,
          "falcon-multi-query": FalconForCausalLM, "falcon-sequential": FalconForCausalLM}


@pytest.mark.parametrize("name", list(NATIVE))
def test_greedy_tokens_match_transformers(randomized_checkpoint, name):
    path, hf = randomized_checkpoint(name)
    expected = hf_greedy(hf, PROMPTS, 40)
    # A small token budget makes the long prompts prefill in chunks next to the others' decodes.
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=16, max_num_seqs=4)
    assert type(llm.llm_engine.runner.built.model) is NATIVE[name]   # not transformers' code run by kvserve
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


@pytest.mark.parametrize("name, layouts", [
    ("gpt-neox", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)]),
    # One key-value head, which both ranks copy.
    ("falcon-multi-query", [dict(tensor_parallel_size=2)]),
])
def test_ranks_and_stages_give_the_tokens_of_one(randomized_checkpoint, name, layouts):
    one, *splits = run_layouts(TOKENS, randomized_checkpoint(name)[0], [{}, *layouts], dtype="float32",
                               kv_cache_memory="16MiB")
    assert [split["tokens"] for split in splits] == [one["tokens"]] * len(splits)


def test_alibi_is_a_clear_error(tiny_model, tmp_path):
    path = shutil.copytree(tiny_model("falcon-multi-query"), tmp_path / "falcon-alibi")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "alibi": True}))
    with pytest.raises(ValueError, match="^Falcon checkpoints with alibi=True are not supported"):
        LLM(str(path), dtype="float32", kv_cache_memory="8MiB")
