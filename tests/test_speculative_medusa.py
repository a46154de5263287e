"""Speculative decoding's medusa method, on heads the tests write in vLLM's layout and in the Medusa project's:
both load to the same heads, their proposals come from the hidden state of each sequence's newest token (checked
against transformers' hidden states and the heads' formula), and greedy outputs are those without speculation."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kvserve import LLM, SamplingParams
from kvserve.core.engine.medusa import MedusaHeads
from kvserve.core.layers import ops

HIDDEN, VOCAB = 64, 384   # the tiny models'


def head_weights(num_heads: int, num_layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random heads under vLLM's names; strong enough that their argmax is far from ties."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for i in range(num_heads):
        for j in range(num_layers):
            weights[f"blocks.{i}.layers.{j}.weight"] = torch.randn(HIDDEN, HIDDEN, generator=generator) * 0.2
            weights[f"blocks.{i}.layers.{j}.bias"] = torch.randn(HIDDEN, generator=generator) * 0.2
        weights[f"lm_heads.{i}.weight"] = torch.randn(VOCAB, HIDDEN, generator=generator)
    return weights


def write_heads(folder, weights: dict, num_heads: int, num_layers: int, layout: str = "vllm", **config) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "vllm":
        config = {"num_heads": num_heads, "num_hidden_layers": num_layers, "hidden_size": HIDDEN,
                  "vocab_size": VOCAB, **config}
        save_file(weights, str(folder / "model.safetensors"))
    else:   # the Medusa project's names
        config = {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers, **config}
        renamed = {}
        for name, tensor in weights.items():
            parts = name.split(".")
            renamed[f"medusa_head.{parts[1]}.{parts[3]}.linear.{parts[4]}" if parts[0] == "blocks"
                    else f"medusa_head.{parts[1]}.{num_layers}.weight"] = tensor
        save_file(renamed, str(folder / "medusa_lm_head.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def reference_proposal(weights: dict, hidden: torch.Tensor, num_tokens: int, num_layers: int) -> list[int]:
    """The heads' formula, written out: head i = lm_head_i(ResBlock^L(h)), ResBlock(x) = x + SiLU(W x + b)."""
    tokens = []
    for i in range(num_tokens):
        x = hidden
        for j in range(num_layers):
            x = x + torch.nn.functional.silu(x @ weights[f"blocks.{i}.layers.{j}.weight"].T
                                             + weights[f"blocks.{i}.layers.{j}.bias"])
        tokens.append(int((x @ weights[f"lm_heads.{i}.weight"].T).argmax()))
    return tokens


def test_both_layouts_load_the_same_heads(tmp_path):
    weights = head_weights(4, 2)
    hidden = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    proposals = []
    for layout in ("vllm", "medusa"):
        path = write_heads(tmp_path / layout, weights, 4, 2, layout)
        proposals.append(MedusaHeads(path, HIDDEN, VOCAB, 3, ops, torch.device("cpu"), torch.float32)
                         .propose(hidden).tolist())
    assert proposals[0] == proposals[1] == [reference_proposal(weights, h, 3, 2) for h in hidden]


def test_proposals_come_from_the_hidden_state_of_each_newest_token(tiny_model, hf_model, tmp_path):
    path, prompt = tiny_model("llama-tied-gqa"), list(range(30, 50))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = LLM(path, dtype="float32", kv_cache_memory="16MiB").generate([prompt], params, use_tqdm=False)[0]
    want = want.outputs[0].token_ids
    weights = head_weights(3, 1)
    config = {"method": "medusa", "model": write_heads(tmp_path / "heads", weights, 3, 1),
              "num_speculative_tokens": 3}
    engine = LLM(path, dtype="float32", kv_cache_memory="16MiB", speculative_config=config).llm_engine
    engine.add_request("r", prompt, params)
    hf, step = hf_model("llama-tied-gqa"), 0
    while engine.has_unfinished_requests():
        engine.step()
        if not engine.scheduler.running:
            break
        seq = engine.scheduler.running[0]
        with torch.no_grad():   # the newest token was chosen from the hidden state of the one before it
            hidden = hf.model(torch.tensor([seq.token_ids[:-1]])).last_hidden_state[0, -1]
        assert seq.head_proposal == reference_proposal(weights, hidden, 3, 1)
        # Then heads that know the continuation, wrong at the second token every other step, so that verified
        # steps keep 3 or 1 of the proposals and the next hidden state is at a different row each time.
        right = want[seq.num_output_tokens:seq.num_output_tokens + 3]
        seq.head_proposal = right if step % 2 else right[:1] + [(t + 1) % VOCAB for t in right[1:2]] + right[2:]
        step += 1
    assert engine.spec_accepted_tokens > engine.spec_verifications   # more than one kept a step, on average
    assert seq.output_token_ids == want


@pytest.mark.parametrize("chunk", [None, 12], ids=["whole-prompts", "chunks-of-12"])
def test_greedy_outputs_are_those_without_speculation(tiny_model, tmp_path, chunk):
    path = tiny_model("llama-tied-gqa")
    config = {"method": "medusa", "model": write_heads(tmp_path / "heads", head_weights(4, 1), 4, 1),
              "num_speculative_tokens": 4}
    prompts = [[5, 17, 42, 99, 3] * 6, [7, 8, 9] * 9 + [11], list(range(20, 44)) * 2, list(range(100, 140))]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    params = [greedy] * 3 + [SamplingParams(n=2, temperature=0, max_tokens=30, ignore_eos=True)]
    outputs = []
    for speculative_config in (None, config):
        llm = LLM(path, dtype="float32", kv_cache_memory="16MiB", max_num_seqs=8, max_num_batched_tokens=chunk,
                  speculative_config=speculative_config)
        outputs.append([[o.token_ids for o in out.outputs] for out in llm.generate(prompts, params, use_tqdm=False)])
    assert outputs[0] == outputs[1]
    engine = llm.llm_engine
    assert engine.spec_proposed_tokens > engine.spec_accepted_tokens
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("change, words", [
    (dict(num_tokens=4), "num_speculative_tokens=4 exceeds the 3 Medusa heads"),
    (dict(hidden_size=32), "take hidden_size=32; the target's is 64"),
    (dict(truncated_vocab_size=100), "predict 100 tokens; the target's vocabulary has 384"),
    (dict(drop="lm_heads.2.weight"), "lack \\['lm_heads.2.weight'\\]"),
])
def test_unfit_heads_are_clear_errors(tiny_model, tmp_path, change, words):
    weights = head_weights(3, 1)
    weights.pop(change.pop("drop", None), None)
    num_tokens = change.pop("num_tokens", 3)
    config = {"method": "medusa", "model": write_heads(tmp_path, weights, 3, 1, **change),
              "num_speculative_tokens": num_tokens}
    with pytest.raises(ValueError, match=words):
        LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="16MiB", speculative_config=config)
