"""GPT-2 and OPT: greedy outputs token-identical to transformers' in float32, with long prompts prefilled in chunks
beside the others' decodes, from checkpoints named as transformers or as their authors name tensors, alone and
split over ranks or stages; the options kvserve does not compute are clear errors."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from parallel_utils import TOKENS, run_layouts
from safetensors.torch import load_file, save_file
from torch import nn

from kvserve import LLM, SamplingParams
from kvserve.conformance.tiny_model import hf_greedy
from kvserve.core.models.gpt2 import GPT2LMHeadModel
from kvserve.core.models.opt import OPTForCausalLM

PROMPTS = [list(range(5, 60)), [7, 8, 9] * 9 + [11], [42], list(range(300, 340))]
NATIVE = {"gpt2": GPT2LMHeadModel, "opt": OPTForCausalLM}


def as_authors_name_them(folder: Path, model_type: str) -> None:
    """Rename the checkpoint's tensors as OpenAI's GPT-2 (no ``transformer.`` prefix, each layer's causal mask
    ``attn.bias`` kept) and Meta's OPT (no ``model.`` prefix) checkpoints do."""
    weights = load_file(folder / "model.safetensors")
    prefix = {"gpt2": "transformer.", "opt": "model."}[model_type]
    renamed = {name.removeprefix(prefix): tensor for name, tensor in weights.items()}
    if model_type == "gpt2":
        layers = {name.split(".")[1] for name in renamed if name.startswith("h.")}
        renamed.update({f"h.{layer}.attn.bias": torch.ones(1, 1, 8, 8).tril() for layer in layers})
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module", params=["gpt2", "gpt2-scaled", "opt", "opt-350m", "opt-plain"])
def checkpoint(request, randomized_checkpoint) -> tuple[str, nn.Module]:
    """Every LayerNorm's weight and every bias random: a model that misplaced a norm or dropped a bias would match
    transformers' ones and zeros. The plain "gpt2" and "opt" ones name their tensors as their authors'
    checkpoints do."""
    path, hf = randomized_checkpoint(request.param)
    if request.param in NATIVE:
        as_authors_name_them(Path(path), request.param)
    return path, hf


def test_greedy_tokens_match_transformers(checkpoint):
    path, hf = checkpoint
    expected = hf_greedy(hf, PROMPTS, 40)
    # A small token budget makes the long prompts prefill in chunks next to the others' decodes.
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=16, max_num_seqs=4)
    assert isinstance(llm.llm_engine.runner.model, NATIVE[hf.config.model_type])   # not transformers' code
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "opt-350m"])
def test_ranks_and_stages_give_the_tokens_of_one(tiny_model, name):
    """GPT-2's fused q/k/v and OPT's separate ones split over two ranks; OPT's projections in and out on different
    stages."""
    layouts = [{}, dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)]
    one, *splits = run_layouts(TOKENS, tiny_model(name), layouts, dtype="float32", kv_cache_memory="16MiB")
    assert [split["tokens"] for split in splits] == [one["tokens"]] * len(splits)


@pytest.mark.parametrize("name, field, value, error", [
    ("gpt2", "reorder_and_upcast_attn", True,
     "GPT-2 checkpoints with reorder_and_upcast_attn=True are not supported; allowed: False"),
    ("gpt2", "add_cross_attention", True,
     "GPT-2 checkpoints with add_cross_attention=True are not supported; allowed: False"),
    ("opt", "activation_function", "swiglu", "activation_function='swiglu' is not supported; allowed: "),
])
def test_options_kvserve_does_not_compute_are_clear_errors(tiny_model, tmp_path, name, field, value, error):
    path = shutil.copytree(tiny_model(name), tmp_path / name)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=f"^{re.escape(error)}"):
        LLM(str(path), dtype="float32", kv_cache_memory="8MiB")
