"""Speculative decoding's eagle method, on EAGLE drafts the tests write as SafeAILab publishes them: every
proposal equals what the draft computes without a cache from transformers' hidden states of the target (through
chunked prefill, the prefix cache, forks, preemption and swaps), and greedy outputs are those without speculation."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import run_python
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaModel

from kvserve import LLM, SamplingParams
from kvserve.core.loader.model_loader import Checkpoint

pytestmark = pytest.mark.slow

TARGET = "llama-draft"   # one layer of hidden size 32: a draft of two can mirror it
PROMPTS = [[5, 17, 42, 99, 3] * 6, [7, 8, 9] * 9 + [11], list(range(20, 44)) * 2, list(range(100, 140))]
GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
# Beside them: two greedy samples of one prompt (forked, a partly filled block copied), and a penalized request.
PARAMS = [GREEDY] * 4 + [SamplingParams(n=2, temperature=0, max_tokens=30, ignore_eos=True),
                         SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=30, ignore_eos=True)]
ALL_PROMPTS = PROMPTS + PROMPTS[:2]


def write_eagle(folder, target_path: str, kind: str) -> str:
    """``random``: every weight random, the hidden states weighing as much as the tokens; safetensors, with a bias
    on ``fc``. ``mirror``: ``fc`` passes the token's embedding alone, the first layer adds nothing and the second
    is the target's layer, so that the draft is the target without its first token in context and most of its
    proposals hold; a PyTorch pickle holding a copy of the embedding, as SafeAILab ships them."""
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    config = LlamaConfig(**{**target.config.to_dict(), "num_hidden_layers": 2})
    generator = torch.Generator().manual_seed(3)
    size = config.hidden_size
    layer = target.model.layers[0].state_dict()
    weights = {}
    for i in range(2):
        for name, tensor in layer.items():
            random = torch.randn(tensor.shape, generator=generator) * 0.3
            weights[f"layers.{i}.{name}"] = torch.ones_like(tensor) if "layernorm" in name else random
    del weights["layers.0.input_layernorm.weight"]
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    if kind == "random":
        weights["fc.weight"] = torch.randn(size, 2 * size, generator=generator) * 0.3
        weights["fc.bias"] = torch.randn(size, generator=generator) * 0.3
        save_file(weights, str(folder / "model.safetensors"))
        return str(folder)
    weights["fc.weight"] = torch.cat([torch.eye(size), torch.zeros(size, size)], dim=1)
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        weights[f"layers.0.{name}"].zero_()
    weights.update({f"layers.1.{name}": tensor for name, tensor in layer.items()})
    weights["embed_tokens.weight"] = target.model.embed_tokens.weight.detach().clone()
    torch.save(weights, folder / "pytorch_model.bin")
    return str(folder)


def read_weights(path: str) -> dict[str, torch.Tensor]:
    files = {file.name: file for file in Path(path).iterdir()}
    if "model.safetensors" in files:
        return load_file(files["model.safetensors"])
    return torch.load(files["pytorch_model.bin"])


class DenseEagle:
    """The draft without a cache: transformers' Llama layers (the first without its input norm, no final norm)
    over every (token, hidden state before it) pair, the target's hidden states from transformers."""

    def __init__(self, path: str, target_path: str):
        self.target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
        weights = read_weights(path)
        self.draft = LlamaModel(LlamaConfig.from_pretrained(path)).eval()
        self.draft.layers[0].input_layernorm = self.draft.norm = torch.nn.Identity()
        self.draft.load_state_dict({k: v for k, v in weights.items() if k.startswith("layers.")}, strict=False)
        self.fc = weights["fc.weight"], weights.get("fc.bias")

    @functools.lru_cache(maxsize=None)
    @torch.no_grad()
    def propose(self, tokens: tuple[int, ...], k: int) -> list[int]:
        hidden = self.target.model(torch.tensor([tokens[:-1]])).last_hidden_state[0]
        inputs, proposal = list(tokens[1:]), []
        for _ in range(k):
            pairs = torch.cat([self.target.model.embed_tokens(torch.tensor(inputs)), hidden], dim=-1)
            pairs = torch.nn.functional.linear(pairs, *self.fc)
            newest = self.draft(inputs_embeds=pairs[None]).last_hidden_state[0, -1:]
            proposal.append(int(self.target.lm_head(newest).argmax()))
            inputs.append(proposal[-1])
            hidden = torch.cat([hidden, newest])
        return proposal


def record_proposals(engine) -> list[tuple[tuple[int, ...], list[int]]]:
    """(a sequence's tokens, the proposal drafted for it) at each drafting, from the engine's own drafter."""
    drafter, seen = engine.runner.drafter, []
    propose = drafter.propose

    def recording(seqs):
        propose(seqs)
        seen.extend((tuple(seq.token_ids), list(seq.proposal)) for seq in seqs)

    drafter.propose = recording
    return seen


@pytest.fixture(scope="module", params=["random", "mirror"])
def eagle(request, tiny_model, tmp_path_factory):
    path = write_eagle(tmp_path_factory.mktemp("eagle") / request.param, tiny_model(TARGET), request.param)
    return request.param, path, DenseEagle(path, tiny_model(TARGET))


def generate(path: str, speculative_config: dict | None, **options):
    llm = LLM(path, speculative_config=speculative_config,
              **{"dtype": "float32", "kv_cache_memory": "16MiB", "max_num_seqs": 8, **options})
    seen = record_proposals(llm.llm_engine) if speculative_config else []
    outputs = [[o.token_ids for o in out.outputs] for out in llm.generate(ALL_PROMPTS, PARAMS, use_tqdm=False)]
    return outputs, seen, llm.llm_engine


@pytest.mark.parametrize("options", [{}, dict(max_num_batched_tokens=12),
                                     dict(num_gpu_blocks_override=8, max_model_len=128)],
                         ids=["whole-prompts", "chunks-of-12", "preempting"])
def test_proposals_and_outputs(tiny_model, eagle, options):
    kind, path, dense = eagle
    target = tiny_model(TARGET)
    plain, _, _ = generate(target, None)
    config = {"method": "eagle", "model": path, "num_speculative_tokens": 3}
    for _ in range(2):   # the second time from the prefix cache
        outputs, seen, engine = generate(target, config, **options)
        assert outputs == plain
        assert len(seen) > 40 and all(proposal == dense.propose(tokens, len(proposal)) for tokens, proposal in seen)
    if "num_gpu_blocks_override" in options:
        assert engine.scheduler.num_preemptions > 0
    proposed, accepted = engine.spec_proposed_tokens, engine.spec_accepted_tokens
    assert (accepted > 0.6 * proposed) if kind == "mirror" else (proposed > accepted)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


SWAPPING = """
import json, sys
from kvserve import LLM, SamplingParams
from kvserve.core.loader.model_loader import Checkpoint
llm = LLM(model=sys.argv[1], device="toy", dtype="float32", max_model_len=96, max_num_batched_tokens=96,
          max_num_seqs=8, num_gpu_blocks_override=8, enable_prefix_caching=False, preemption_mode="swap",
          swap_space="2MiB", speculative_config={"method": "eagle", "model": sys.argv[2], "num_speculative_tokens": 3})
drafter, seen = llm.llm_engine.runner.drafter, []
propose = drafter.propose
def recording(seqs):
    propose(seqs)
    seen.extend((seq.token_ids[:], seq.proposal[:]) for seq in seqs)
drafter.propose = recording
prompts = [[(7 * i + j) % 380 + 3 for j in range(20 + 9 * i)] for i in range(5)]
outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
print(json.dumps(dict(outputs=[o.outputs[0].token_ids for o in outputs], seen=seen,
                      swap_outs=llm.llm_engine.scheduler.num_swap_outs)))
"""


def test_swapped_sequences_keep_their_hidden_states(plugin_site, tiny_model, eagle):
    """On the toy platform (a device with memory of its own), whose blocks swap to the host and back."""
    _, path, dense = eagle
    result = json.loads(run_python(plugin_site, ["-c", SWAPPING, tiny_model(TARGET), path]).splitlines()[-1])
    assert result["swap_outs"] > 0
    prompts = [[(7 * i + j) % 380 + 3 for j in range(20 + 9 * i)] for i in range(5)]
    want = LLM(tiny_model(TARGET), dtype="float32", kv_cache_memory="16MiB").generate(
        prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert result["outputs"] == [o.outputs[0].token_ids for o in want]
    assert all(proposal == dense.propose(tuple(tokens), len(proposal)) for tokens, proposal in result["seen"])


def test_smollm2_with_an_eagle_draft_gives_its_greedy_outputs(smollm2_path, tmp_path):
    target = Checkpoint.open(smollm2_path).hf_config
    config = LlamaConfig(**{**target.to_dict(), "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"]})
    torch.manual_seed(0)
    weights = {f"layers.0.{name}": tensor for name, tensor in LlamaModel(config).layers[0].state_dict().items()
               if name != "input_layernorm.weight"}
    weights["fc.weight"] = torch.randn(config.hidden_size, 2 * config.hidden_size) * 0.02
    config.save_pretrained(tmp_path)
    save_file(weights, str(tmp_path / "model.safetensors"))
    prompts = ["The capital of France is", "List three colors:"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = []
    for speculative_config in (None, {"method": "eagle", "model": str(tmp_path), "num_speculative_tokens": 3}):
        llm = LLM(smollm2_path, speculative_config=speculative_config, kv_cache_memory="64MiB", max_model_len=512)
        outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert outputs[0] == outputs[1]
    assert llm.llm_engine.spec_proposed_tokens > 0


@pytest.mark.parametrize("change, words", [
    (dict(hidden_size=48, head_dim=16), "takes hidden states of 48; the target's have 32"),
    (dict(draft_vocab_size=100), "is an EAGLE-3 draft \\(draft_vocab_size=100\\); the eagle method runs EAGLE-1"),
    (dict(vocab_size=500), "has a vocabulary of 500 tokens, the target 384"),
    (dict(max_position_embeddings=64), "takes 64 positions, fewer than max_model_len=256"),
    ({}, "has no \\*.safetensors \\(or pytorch_model\\*.bin\\) weights"),
])
def test_unfit_drafts_are_clear_errors(tiny_model, tmp_path, change, words):
    config = AutoModelForCausalLM.from_pretrained(tiny_model(TARGET)).config
    LlamaConfig(**{**config.to_dict(), **change}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=words):
        LLM(tiny_model(TARGET), dtype="float32", kv_cache_memory="16MiB",
            speculative_config={"method": "eagle", "model": str(tmp_path), "num_speculative_tokens": 2})


@pytest.mark.parametrize("target, model_class", [("gpt2", "GPT2LMHeadModel"), ("gemma", "GemmaForCausalLM")])
def test_a_target_outside_the_llama_family_is_a_clear_error(tiny_model, tmp_path, target, model_class):
    path = write_eagle(tmp_path / "eagle", tiny_model(TARGET), "random")
    with pytest.raises(ValueError, match=f"EAGLE drafts run on Llama-family targets .* not on {model_class}: use "
                                         f"method 'draft_model' or 'ngram'"):
        LLM(tiny_model(target), dtype="float32", kv_cache_memory="16MiB",
            speculative_config={"method": "eagle", "model": path, "num_speculative_tokens": 2})


def test_a_draft_with_weights_of_another_kind_is_a_clear_error(tiny_model, tmp_path):
    path = write_eagle(tmp_path / "eagle", tiny_model(TARGET), "random")
    weights = read_weights(path)
    weights["lm_head.weight"] = torch.zeros(384, 32)
    save_file(weights, f"{path}/model.safetensors")
    with pytest.raises(ValueError, match="checkpoint tensor 'lm_head.weight' has no place in EagleLlama"):
        LLM(tiny_model(TARGET), dtype="float32", kv_cache_memory="16MiB",
            speculative_config={"method": "eagle", "model": path, "num_speculative_tokens": 2})
