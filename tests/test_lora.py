"""LoRA adapters: greedy tokens equal transformers + peft with the adapter merged, a step mixes adapters and the
base model without changing any request's tokens, the prefix cache keeps adapters apart, and bad adapters or
options are refused before anything runs."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from lora_adapters import ALL_PROJECTIONS, save_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvserve import LLM, LoRARequest, SamplingParams
from kvserve.conformance.tiny_model import hf_greedy
from kvserve.core.config import build_engine_config
from kvserve.core.layers.linear import MergedLinear
from kvserve.core.lora.layers import LoRALayer, LoRAStep
from kvserve.kernels_cpu.linear import packed_linear

TEXTS = ["The quick brown fox jumps over the lazy dog. Paged attention stores keys and values in blocks.",
         "Once upon a time", "Continuous batching lets new requests join"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(dtype="float32", kv_cache_memory="8MiB", enable_lora=True)


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama-tied-gqa")


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    """Three adapters over the tiny Llama, each with what transformers generates with it merged; 0: the base."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {1: (ALL_PROJECTIONS, 8, {}), 2: (["q_proj", "v_proj"], 16, {"use_rslora": True}),
             3: (["k_proj", "o_proj", "up_proj"], 4, {})}
    tokenizer = AutoTokenizer.from_pretrained(llama)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    made = {0: (None, hf_greedy(AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32), prompts, 12))}
    for lora_id, (targets, rank, options) in specs.items():
        folder, merged = save_adapter(llama, str(root / f"a{lora_id}"), lora_id, targets, rank, **options)
        made[lora_id] = LoRARequest(f"a{lora_id}", lora_id, folder), hf_greedy(merged, prompts, 12)
    return prompts, made


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make_kernel", [lambda weight: None, packed_linear], ids=["torch", "cpu-platform"])
def test_a_layer_takes_each_token_through_its_own_slot(make_kernel, dtype):
    """A merged layer of three shards, its two slots holding adapters of different ranks and shards; tokens with
    either adapter or none. The platform's kernels, prepared at start on zeros, are prepared again after loading."""
    generator = torch.Generator().manual_seed(0)
    sizes = {"q": 32, "k": 16, "v": 16}
    layer, step = MergedLinear(64, sizes), LoRAStep()
    lora = LoRALayer(layer, step, make_kernel, slots=2, rank=8, dtype=dtype, device=torch.device("cpu"))
    adapters = [{0: 8, 2: 8}, {1: 4}]   # per slot: {shard: rank}
    weights = [{shard: (torch.randn(rank, 64, generator=generator),
                        torch.randn(list(sizes.values())[shard], rank, generator=generator) / 8)
                for shard, rank in ranks.items()} for ranks in adapters]
    for slot, adapter in enumerate(weights):
        lora.load(slot, {shard: (a.to(dtype), b.to(dtype)) for shard, (a, b) in adapter.items()})
    lora.prepare_kernels()
    x, token_slots = torch.randn(5, 64, generator=generator), torch.tensor([1, -1, 0, 1, 0])
    step.take(token_slots, 2, dtype, torch.device("cpu"))
    out = torch.randn(5, 64, generator=generator)
    expected = out.clone()
    for token, slot in enumerate(token_slots.tolist()):
        for shard, (a, b) in (weights[slot] if slot >= 0 else {}).items():
            rows = slice(sum(list(sizes.values())[:shard]), sum(list(sizes.values())[:shard + 1]))
            expected[token, rows] += b @ (a @ x[token])
    got = lora(x.to(dtype), out.to(dtype)).float()
    torch.testing.assert_close(got, expected, **({} if dtype == torch.float32 else dict(rtol=0.03, atol=0.05)))


def test_each_adapter_gives_transformers_tokens_with_it_merged(llama, adapters):
    prompts, made = adapters
    llm = LLM(llama, max_loras=1, **ENGINE)
    for lora_id, (request, expected) in made.items():
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=request)
        assert tokens(outputs) == expected and all(o.lora_request == request for o in outputs)
        assert lora_id == 0 or expected != made[0][1]   # the adapter changes what the model says


@pytest.mark.parametrize("arch, targets", [("qwen2", ALL_PROJECTIONS),   # biases on q, k and v
                                           ("phi3-sliding", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])])
def test_merged_and_fused_checkpoint_projections_match_transformers(tiny_model, tmp_path, arch, targets):
    """Qwen2's separate q, k, v, gate and up tensors into kvserve's merged layers; Phi-3's fused qkv and gate-up
    tensors, one A for the shards of each."""
    base = tiny_model(arch)
    prompts = [AutoTokenizer.from_pretrained(base)(t)["input_ids"] for t in TEXTS]
    without = hf_greedy(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), prompts, 12)
    folder, merged = save_adapter(base, str(tmp_path), 0, targets)
    expected = hf_greedy(merged, prompts, 12)
    llm = LLM(base, **ENGINE)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=LoRARequest("a", 1, folder))) == expected
    assert expected != without


@pytest.mark.parametrize("max_loras", [3, 1])
def test_a_step_mixes_adapters_and_the_base_model(llama, adapters, max_loras):
    """Every prompt with every adapter and none in one call: 3 adapters and the base in the same steps, or, with
    max_loras=1 and one adapter in host memory, adapters taking turns and read again from disk."""
    prompts, made = adapters
    llm = LLM(llama, max_loras=max_loras, max_cpu_loras=max_loras, **ENGINE)
    engine = llm.llm_engine
    pairs = [(i, lora_id) for lora_id in made for i in range(len(prompts))]
    for n, (i, lora_id) in enumerate(pairs):
        engine.add_request(str(n), prompts[i], GREEDY, lora_request=made[lora_id][0])
    done, most_adapters = {}, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[int(output.request_id)] = output.outputs[0].token_ids
        most_adapters = max(most_adapters, len({s.lora_id for s in engine.scheduler.running} - {0}))
    assert most_adapters == max_loras
    assert [done[n] for n in range(len(pairs))] == [made[lora_id][1][i] for i, lora_id in pairs]
    alone = llm.generate(prompts[0], GREEDY, use_tqdm=False, lora_request=made[2][0])
    assert tokens(alone) == [made[2][1][0]]


def test_the_prefix_cache_keeps_adapters_apart(llama, adapters):
    prompts, made = adapters
    llm = LLM(llama, max_loras=2, **ENGINE)
    manager = llm.llm_engine.block_manager
    assert len(prompts[0]) > 2 * manager.block_size
    hits = []
    for lora_id in (1, 2, 0, 1):
        out = llm.generate(prompts[0], GREEDY, use_tqdm=False, lora_request=made[lora_id][0])
        assert tokens(out) == [made[lora_id][1][0]]
        hits.append(manager.prefix_hits)
    assert hits[:3] == [0, 0, 0] and hits[3] >= 2 * manager.block_size   # only adapter 1's second run hits


def test_bad_adapters_and_options_are_refused_before_anything_runs(llama, adapters, tiny_model, tmp_path):
    prompts, made = adapters
    llm = LLM(llama, max_lora_rank=8, **ENGINE)
    too_big = made[2][0]   # rank 16
    with pytest.raises(ValueError, match=r"'a2' .* has rank 16, above max_lora_rank=8: .*allowed: 1, 8, 16"):
        llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=[made[1][0], made[1][0], too_big])
    unknown = shutil.copytree(made[1][0].lora_path, tmp_path / "unknown")
    config = json.loads((unknown / "adapter_config.json").read_text())
    (unknown / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "qkv_pro"]}))
    with pytest.raises(ValueError, match=r"targets modules \['qkv_pro'\] that the model does not have .*allowed "
                                         r"modules: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        llm.generate(prompts[0], GREEDY, use_tqdm=False, lora_request=LoRARequest("unknown", 7, str(unknown)))
    other_base, _ = save_adapter(tiny_model("llama-draft"), str(tmp_path / "other"), 0, ["q_proj"])
    with pytest.raises(ValueError, match=r"does not fit the base model: model.layers.0.self_attn.q_proj's lora_A "
                                         r"has shape \(8, 32\), the model's layer needs \(8, 64\)"):
        llm.generate(prompts[0], GREEDY, use_tqdm=False, lora_request=LoRARequest("other", 8, other_base))
    with pytest.raises(ValueError, match="no such folder"):
        llm.generate(prompts[0], GREEDY, use_tqdm=False, lora_request=LoRARequest("gone", 9, str(tmp_path / "x")))
    with pytest.raises(ValueError, match="lora_int_id 1 is adapter 'a1' .* not 'again'"):
        llm.generate(prompts[0], GREEDY, use_tqdm=False, lora_request=LoRARequest("again", 1, str(unknown)))
    assert not llm.llm_engine.has_unfinished_requests()
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=made[1][0])) == made[1][1]
    with pytest.raises(ValueError, match="needs an engine started with enable_lora=True"):
        LLM(llama, dtype="float32", kv_cache_memory="8MiB").generate(prompts[0], lora_request=made[1][0])
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("zero", 0, made[1][0].lora_path)
    for options, words in (({"max_loras": 0}, "max_loras must be >= 1, got 0"),
                           ({"max_lora_rank": 12}, "max_lora_rank must be one of 1, 8, 16, 32, 64, 128, 256, got 12"),
                           ({"max_loras": 2, "max_cpu_loras": 1}, r"max_cpu_loras must be >= max_loras \(2\)"),
                           ({"tensor_parallel_size": 2}, "enable_lora runs on one process")):
        with pytest.raises(ValueError, match=words):
            build_engine_config(llama, enable_lora=True, **options)


def test_smollm2_with_an_adapter_matches_transformers(smollm2_path, tmp_path):
    """SmolLM2's Q4_1 GGUF, its blocks dequantized by transformers for the reference."""
    folder, name = os.path.split(smollm2_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    _, merged = save_adapter(hf, str(tmp_path), 0, ALL_PROJECTIONS)
    llm = LLM(max_model_len=256, kv_cache_memory="64MiB", dtype="float32", enable_lora=True, max_lora_rank=8)
    prompts = [llm.get_tokenizer()(t)["input_ids"] for t in TEXTS[:2]]
    expected = hf_greedy(merged, prompts, 8)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=LoRARequest("smol", 1, str(tmp_path)))
    assert tokens(outputs) == expected
