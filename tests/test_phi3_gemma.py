"""Phi-3, Gemma and Gemma 2: greedy outputs token-identical to transformers' in float32, run by the native classes
(not the transformers fallback), with long prompts prefilled in chunks beside decodes; Phi-3 with partial rotary and
longrope past the original context, and with a sliding window shorter than the prompts; Gemma 2 with a sliding
layer beside a global one, and soft-capped scores and logits; split over ranks, the tokens of one; unsupported
options are clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from parallel_utils import TOKENS, run_layouts

from kvserve import LLM, SamplingParams
from kvserve.conformance.tiny_model import hf_greedy

pytestmark = pytest.mark.slow

# Every prompt is longer than phi3-longrope's original context (64): transformers rotates shorter ones with the
# short factors, kvserve every position with the long ones (docs/models.md).
PROMPTS = [list(range(5, 80)), [7, 8, 9] * 25 + [11], list(range(300, 370))]
ARCHITECTURES = {"phi3-longrope": "Phi3ForCausalLM", "phi3-sliding": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM",
                 "gemma2": "Gemma2ForCausalLM"}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def checkpoint(request, randomized_checkpoint) -> tuple[str, torch.nn.Module]:
    """Every RMS norm's weight random: a model that misplaced a norm or dropped Gemma's 1 + would match
    transformers' ones (Gemma's zeros)."""
    return randomized_checkpoint(request.param)


def test_greedy_tokens_match_transformers(checkpoint):
    path, hf = checkpoint
    expected = hf_greedy(hf, PROMPTS, 24)
    # A small token budget makes the prompts prefill in chunks next to the others' decodes.
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=16, max_num_seqs=4)
    assert type(llm.llm_engine.runner.model).__name__ == hf.config.architectures[0]
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_gemma2_logprobs_are_those_of_its_capped_logits(randomized_checkpoint):
    """Capping keeps the logits' order, so greedy tokens cannot show the final cap: their logprobs do."""
    path, hf = randomized_checkpoint("gemma2")
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPTS[0]])).logits[0, -1].log_softmax(-1).topk(5)
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB")
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    top = out[0].outputs[0].logprobs[0]
    got = torch.tensor([top[token].logprob for token in expected.indices.tolist()])
    torch.testing.assert_close(got, expected.values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["phi3-longrope", "gemma", "gemma2"])
def test_ranks_and_stages_give_the_tokens_of_one(tiny_model, name):
    """Phi-3's fused q/k/v and gate/up tensors split per rank; Gemma's single key-value head copied to both; each
    stage with its own layers' norms and rotary, the first scaling the embeddings; Gemma 2's second stage with the
    second layer's window (none)."""
    layouts = [{}, dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)]
    one, *splits = run_layouts(TOKENS, tiny_model(name), layouts, dtype="float32", kv_cache_memory="16MiB")
    assert [split["tokens"] for split in splits] == [one["tokens"]] * len(splits)


@pytest.mark.parametrize("name, field, value", [
    ("phi3-sliding", "hidden_act", "gelu"),
    ("gemma", "hidden_act", "relu"),
    ("gemma", "hidden_activation", "gelu"),
    ("gemma", "use_bidirectional_attention", True),
])
def test_unsupported_options_are_clear_errors(tiny_model, tmp_path, name, field, value):
    path = shutil.copytree(tiny_model(name), tmp_path / name)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=f"checkpoints with {field}={value!r} are not supported"):
        LLM(str(path), dtype="float32", kv_cache_memory="8MiB")
