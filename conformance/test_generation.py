"""End to end on a tiny Llama with grouped-query attention: greedy tokens equal transformers' in float32, with
prompts long enough to prefill in chunks beside other sequences' decodes; replayed graphs give eager's tokens."""
from __future__ import annotations

import pytest
import torch

from kvserve.conformance.tiny_model import hf_greedy

PROMPTS = [[5, 17, 42, 99, 3] * 6, [7, 8, 9] * 9 + [11], list(range(20, 44)) * 2, [3, 1, 4, 1, 5]]
MAX_TOKENS = 24


def kvserve_greedy(path: str, platform_name: str, **options) -> tuple[list[list[int]], object]:
    from kvserve import LLM, SamplingParams

    # A small token budget makes the long prompts prefill in chunks next to the others' decodes.
    llm = LLM(path, device=platform_name, kv_cache_memory="16MiB", max_num_batched_tokens=16, max_num_seqs=4,
              **options)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], llm.llm_engine


def test_greedy_tokens_equal_transformers(platform, tiny_llama):
    from transformers import AutoModelForCausalLM

    if torch.float32 not in platform.info.supported_dtypes:
        pytest.skip(f"platform {platform.name!r} does not run float32, in which the tokens must be exact")
    expected = hf_greedy(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), PROMPTS,
                         MAX_TOKENS)
    tokens, _ = kvserve_greedy(tiny_llama, platform.name, dtype="float32", enforce_eager=True)
    assert tokens == expected


def test_graph_replay_gives_eager_tokens(platform, tiny_llama):
    replayed, engine = kvserve_greedy(tiny_llama, platform.name)
    if engine.runner.graph_runner is None:
        pytest.skip(f"platform {platform.name!r} captures no graphs for this model (platform_graph_runner: None)")
    eager, _ = kvserve_greedy(tiny_llama, platform.name, enforce_eager=True)
    assert replayed == eager
