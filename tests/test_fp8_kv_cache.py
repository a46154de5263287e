"""The FP8 KV cache (``kv_cache_dtype`` fp8 / fp8_e5m2): twice the tokens of bfloat16 in one budget, each layer's
keys and values stored as fp8(x / scale) with the checkpoint's scales (1.0 without), and the engine's logprobs
those of transformers attending keys and values rounded so, through whole prompts, chunks after cached context,
prefix-cache hits and decodes."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvserve.conformance.attention import as_fp8_cache_holds
from kvserve import LLM, SamplingParams

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
PROMPT = [5, 17, 301, 44, 9, 250, 3, 88, 120, 7, 61, 372, 14, 200, 33, 91, 150, 6, 77, 240]   # more than a block
NUM_LAYERS = 2


@pytest.fixture(scope="module")
def scaled_checkpoint(tiny_model, hf_model, tmp_path_factory) -> tuple[str, list[tuple[float, float]]]:
    """The tiny llama with compressed-tensors' per-layer ``self_attn.k_scale`` / ``v_scale`` added: each a 600th
    of the largest output the prompt gives that layer's k_proj (v_proj), so that the largest values (and keys, but
    for rotary) saturate at e4m3's 448."""
    path, largest = tiny_model("llama-tied-gqa"), {}
    hf = hf_model("llama-tied-gqa")
    hooks = [getattr(layer.self_attn, proj).register_forward_hook(
        lambda module, args, out, key=(i, proj): largest.__setitem__(key, out.abs().max().item()))
        for i, layer in enumerate(hf.model.layers) for proj in ("k_proj", "v_proj")]
    with torch.no_grad():
        hf(torch.tensor([PROMPT]))
    for hook in hooks:
        hook.remove()
    as_stored = lambda x: torch.tensor(x).item()   # noqa: E731  (float32, as the checkpoint holds it)
    scales = [(as_stored(largest[i, "k_proj"] / 600), as_stored(largest[i, "v_proj"] / 600)) for i in range(NUM_LAYERS)]
    folder = tmp_path_factory.mktemp("kv-scales")
    shutil.copytree(path, folder, dirs_exist_ok=True)
    tensors = load_file(folder / "model.safetensors")
    for i, (key_scale, value_scale) in enumerate(scales):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([key_scale])
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([value_scale])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder), scales


def transformers_logprobs(path: str, tokens: list[int], cache_dtype: torch.dtype | None,
                          scales: list[tuple[float, float]], prepare=lambda model: None) -> list[float]:
    """transformers' logprob of each token after the first, its attention reading keys and values (after rotary)
    as an FP8 cache of ``cache_dtype`` holds them; ``prepare`` may change the model first."""
    def attend(module, query, key, value, attention_mask, **kwargs):
        if cache_dtype is not None:
            key_scale, value_scale = scales[module.layer_idx]
            key = as_fp8_cache_holds(key, cache_dtype, key_scale)
            value = as_fp8_cache_holds(value, cache_dtype, value_scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("kvserve-test-fp8-cache", attend)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              attn_implementation="kvserve-test-fp8-cache").eval()
    prepare(hf)
    with torch.no_grad():
        logprobs = hf(torch.tensor([tokens])).logits[0].log_softmax(-1)
    return [logprobs[i - 1, token].item() for i, token in enumerate(tokens) if i > 0]


def engine_logprobs(llm: LLM, prompt: list[int], of_prompt: bool = True) -> tuple[list[int], list[float]]:
    """(prompt and greedy tokens, the engine's logprob of each after the first; without ``of_prompt``, of the
    greedy ones only, which leaves the prompt's blocks to the prefix cache)."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0,
                            prompt_logprobs=0 if of_prompt else None)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    generated = out.outputs[0]
    logprobs = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])] if of_prompt else []
    logprobs += [entry[token].logprob for entry, token in zip(generated.logprobs, generated.token_ids)]
    return prompt + list(generated.token_ids), logprobs


@pytest.mark.parametrize("kv_cache_dtype", list(FP8))
@pytest.mark.parametrize("chunk", [None, 8], ids=["whole-prompt", "chunks-of-8"])
def test_the_engine_attends_keys_and_values_as_the_fp8_cache_holds_them(scaled_checkpoint, kv_cache_dtype, chunk):
    path, scales = scaled_checkpoint
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB", kv_cache_dtype=kv_cache_dtype,
              max_num_batched_tokens=chunk, max_num_seqs=4)
    layers = [m for m in llm.llm_engine.runner.model.modules() if getattr(m, "kv_scales", None)]
    assert [layer.kv_scales for layer in layers] == scales
    tokens, ours = engine_logprobs(llm, PROMPT)
    expected = transformers_logprobs(path, tokens, FP8[kv_cache_dtype], scales)
    assert ours == pytest.approx(expected, abs=1e-3)
    unrounded = transformers_logprobs(path, tokens, None, scales)
    assert max(abs(a - b) for a, b in zip(ours, unrounded)) > 2e-2   # the rounding shows: the check above can fail
    for _ in range(2):   # the prompt's first block from the prefix cache
        again, decoded = engine_logprobs(llm, PROMPT, of_prompt=False)
        assert again == tokens and decoded == pytest.approx(expected[-len(decoded):], abs=1e-3)
    assert llm.llm_engine.block_manager.prefix_hits > 0


def largest_keys_and_values(path: str, tokens: list[int], scales: list[tuple[float, float]]
                            ) -> list[tuple[float, float]]:
    """Each layer's largest |key| (after rotary) and |value| over ``tokens``, as transformers computes them with
    attention reading the keys and values as an e4m3 cache of ``scales`` holds them."""
    largest = {}

    def attend(module, query, key, value, attention_mask, **kwargs):
        largest[module.layer_idx] = (key.abs().max().item(), value.abs().max().item())
        key_scale, value_scale = scales[module.layer_idx]
        key = as_fp8_cache_holds(key, torch.float8_e4m3fn, key_scale)
        value = as_fp8_cache_holds(value, torch.float8_e4m3fn, value_scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("kvserve-test-largest-kv", attend)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="kvserve-test-largest-kv")
    with torch.no_grad():
        hf(torch.tensor([tokens]))
    return [largest[i] for i in range(NUM_LAYERS)]


def test_calculated_scales_come_from_the_first_batch_and_stay(scaled_checkpoint):
    path, checkpoint_scales = scaled_checkpoint
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB", kv_cache_dtype="fp8", calculate_kv_scales=True,
              max_num_seqs=4)
    layers = [m for m in llm.llm_engine.runner.model.modules() if hasattr(m, "kv_scales")]
    assert [layer.kv_scales for layer in layers] == [None] * NUM_LAYERS   # until the first batch
    tokens, ours = engine_logprobs(llm, PROMPT)
    calculated = [layer.kv_scales for layer in layers]
    # e4m3's 448 over the headroom of 4: the first batch's largest key becomes 112. A layer's keys follow the
    # earlier layers' rounded ones.
    expected = [(key / 112, value / 112) for key, value in largest_keys_and_values(path, PROMPT, calculated)]
    for got, want in zip(calculated, expected):
        assert got == pytest.approx(want, rel=1e-5)
    assert calculated != checkpoint_scales
    assert ours == pytest.approx(transformers_logprobs(path, tokens, torch.float8_e4m3fn, calculated), abs=1e-3)
    another = list(reversed(PROMPT)) * 3   # its own scales would differ; the cache keeps the first batch's
    engine_logprobs(llm, another)
    assert [layer.kv_scales for layer in layers] == calculated


def test_without_checkpoint_scales_keys_and_values_are_stored_as_they_are(tiny_model):
    path = tiny_model("llama-tied-gqa")
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB", kv_cache_dtype="fp8", max_num_seqs=4)
    tokens, ours = engine_logprobs(llm, PROMPT)
    ones = [(1.0, 1.0)] * NUM_LAYERS
    assert ours == pytest.approx(transformers_logprobs(path, tokens, torch.float8_e4m3fn, ones), abs=1e-3)


@pytest.mark.parametrize("dtype,ratio", [("bfloat16", 2), ("float32", 4)])
def test_an_fp8_cache_holds_more_tokens_in_the_same_budget(tiny_model, dtype, ratio):
    blocks = {}
    for kv_cache_dtype in ("auto", "fp8"):
        runner = LLM(tiny_model("qwen2"), dtype=dtype, kv_cache_memory="8MiB", kv_cache_dtype=kv_cache_dtype,
                     max_num_seqs=4).llm_engine.runner
        blocks[kv_cache_dtype] = runner.num_blocks
        assert runner.kv_cache.dtype == (torch.float8_e4m3fn if kv_cache_dtype == "fp8" else getattr(torch, dtype))
    assert blocks["fp8"] == ratio * blocks["auto"]


@pytest.mark.parametrize("change, words", [
    (lambda t: t.pop("model.layers.1.self_attn.v_scale"),
     "checkpoint has a key cache scale for 'model.layers.1.self_attn' but no value scale"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.k_scale", torch.tensor([0.0])),
     "checkpoint KV cache scale 'model.layers.0.self_attn.k_scale' is 0.0; it must be positive and finite"),
    (lambda t: t.__setitem__("model.layers.7.self_attn.kv_scale", torch.tensor([1.0])),
     "checkpoint KV cache scales for 'model.layers.7.self_attn' have no attention layer in LlamaForCausalLM"),
])
def test_bad_checkpoint_scales_are_clear_errors(scaled_checkpoint, tmp_path, change, words):
    shutil.copytree(scaled_checkpoint[0], tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    change(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=words):
        LLM(str(tmp_path), dtype="float32", kv_cache_memory="8MiB", kv_cache_dtype="fp8")


def test_smollm2_keeps_its_perplexity_with_an_fp8_cache(smollm2_path):
    from test_quantization import TEXT, perplexity, smollm2_perplexity

    llm = LLM(smollm2_path, dtype="float32", kv_cache_dtype="fp8", kv_cache_memory="64MiB", max_model_len=1024)
    assert perplexity(llm, TEXT.read_text()) == pytest.approx(smollm2_perplexity(smollm2_path, None), rel=0.01)


def test_checkpoint_scales_are_unused_by_a_cache_in_the_model_dtype(scaled_checkpoint):
    path, _ = scaled_checkpoint
    tokens, ours = engine_logprobs(LLM(path, dtype="float32", kv_cache_memory="8MiB", max_num_seqs=4), PROMPT)
    assert ours == pytest.approx(transformers_logprobs(path, tokens, None, []), abs=1e-4)


@pytest.fixture(scope="module")
def autoround_fp8_kv(tiny_model, tmp_path_factory) -> str:
    """The tiny llama as AutoRound writes FP8_STATIC with static FP8 KV cache scales (``static_kv_dtype``), in its
    llm_compressor format: compressed-tensors' kv_cache_scheme and each layer's self_attn.k_scale / v_scale."""
    from auto_round import AutoRound
    from auto_round.experimental import kv_cache
    from transformers import AutoTokenizer

    from test_compressed_tensors import CALIBRATION

    path = tiny_model("llama-tied-gqa")
    hook, update = kv_cache.calibrate_kv_cache_input_hook, kv_cache.QuantizedKVParameterCache.update

    def hook_for_this_transformers(module, args, kwargs):   # whose attention takes the cache as `cache`
        args, kwargs = hook(module, args, kwargs)
        kwargs["cache"] = kwargs.pop("past_key_value", None)
        return args, kwargs

    with pytest.MonkeyPatch.context() as patch:   # auto-round 0.16 predates transformers 5.24's cache arguments
        patch.setattr(kv_cache, "calibrate_kv_cache_input_hook", hook_for_this_transformers)
        patch.setattr(kv_cache.QuantizedKVParameterCache, "update",
                      lambda self, key, value, layer, kwargs=None: update(self, key, value, layer))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        rounder = AutoRound(model, AutoTokenizer.from_pretrained(path), scheme="FP8_STATIC", iters=0,
                            disable_opt_rtn=True, static_kv_dtype="fp8", **CALIBRATION)
        folder = tmp_path_factory.mktemp("fp8-static-kv")
        rounder.quantize_and_save(str(folder), format="llm_compressor")
    return str(next(folder.glob("*/config.json")).parent)


def test_an_autoround_fp8_kv_export_runs_with_its_scales(autoround_fp8_kv, tiny_model):
    from test_compressed_tensors import on_its_weights, read

    quantized, tensors = read(autoround_fp8_kv)
    scales = [(tensors[f"model.layers.{i}.self_attn.k_scale"].item(), tensors[f"model.layers.{i}.self_attn.v_scale"]
               .item()) for i in range(NUM_LAYERS)]
    llm = LLM(autoround_fp8_kv, dtype="float32", kv_cache_memory="8MiB", kv_cache_dtype="fp8", max_num_seqs=4)
    assert [m.kv_scales for m in llm.llm_engine.runner.model.modules() if getattr(m, "kv_scales", None)] == scales
    tokens, ours = engine_logprobs(llm, PROMPT)
    expected = transformers_logprobs(tiny_model("llama-tied-gqa"), tokens, torch.float8_e4m3fn, scales,
                                     lambda hf: on_its_weights(hf, quantized))
    assert ours == pytest.approx(expected, abs=1e-3)
