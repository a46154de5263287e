"""Qwen3 and Qwen3-MoE: greedy outputs token-identical to transformers' in float32, alone and split over ranks or
stages, with and without attention biases; a sliding window, not supported yet, is a clear error."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from parallel_utils import TOKENS, run_layouts

from kvserve import LLM, SamplingParams
from kvserve.conformance.tiny_model import hf_greedy

pytestmark = pytest.mark.slow

PROMPTS = [list(range(5, 60)), [7, 8, 9] * 9 + [11], [42], list(range(300, 340))]


@pytest.fixture(scope="module", params=["qwen3", "qwen3-bias", "qwen3-moe"])
def checkpoint(request, randomized_checkpoint) -> tuple[str, torch.nn.Module]:
    """Every RMS norm's weight and every bias random: a model that swapped q_norm and k_norm, normed after rotary,
    or dropped a bias would match transformers' ones and zeros."""
    return randomized_checkpoint(request.param)


def test_greedy_tokens_match_transformers(checkpoint):
    path, hf = checkpoint
    expected = hf_greedy(hf, PROMPTS, 40)
    # A small token budget makes the long prompts prefill in chunks next to the others' decodes.
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=16, max_num_seqs=4)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_ranks_and_stages_give_the_tokens_of_one(checkpoint):
    path, hf = checkpoint
    layouts = [{}, dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)]
    if hf.config.model_type == "qwen3_moe":
        layouts.append(dict(tensor_parallel_size=2, enable_expert_parallel=True))
    one, *splits = run_layouts(TOKENS, path, layouts, dtype="float32", kv_cache_memory="16MiB")
    assert [split["tokens"] for split in splits] == [one["tokens"]] * len(splits)


def test_a_sliding_window_without_layer_types_is_a_clear_error(tiny_model, tmp_path):
    # Qwen3-MoE's config lists no layer_types, which say the sliding layers (tests/test_sliding_window_blocks.py).
    path = shutil.copytree(tiny_model("qwen3-moe"), tmp_path / "qwen3-moe")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 16}))
    with pytest.raises(ValueError, match="^qwen3_moe checkpoints with use_sliding_window=True and no layer_types are "
                                         "not supported; allowed: use_sliding_window=False, or layer_types"):
        LLM(str(path), dtype="float32", kv_cache_memory="8MiB")
