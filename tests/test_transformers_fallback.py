"""The transformers fallback: a causal LM that kvserve has no native file for runs transformers' own modeling code
on kvserve's paged KV cache and attention. Its greedy tokens equal transformers' generate, with prompts batched,
prefilled in chunks beside decodes and found in the prefix cache; Llama through it equals the native Llama; what
it cannot run is a clear error."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from server_utils import openai_client, start_server, stop_server
from transformers import AutoModelForCausalLM, Gemma2Config, GraniteConfig, Lfm2Config, Olmo2Config, StableLmConfig

from kvserve import LLM, SamplingParams
from kvserve.conformance.tiny_model import build_tokenizer, hf_greedy, randomize_norms_and_biases, save_tiny_model
from kvserve.core.entrypoints.cli import main
from kvserve.core.models.transformers_fallback import TransformersForCausalLM

PROMPTS = [list(range(5, 60)), [7, 8, 9] * 9 + [11], [42], list(range(300, 340))]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SMALL = dict(dtype="float32", kv_cache_memory="8MiB")
CHECKPOINTS = {
    # RMS norms over the whole query and key projections, norms after attention and MLP; q/k/v/o biases; tied head.
    "olmo2": (Olmo2Config, dict(attention_bias=True)),
    # Its own attention scale, multipliers on the embeddings and residuals, logits divided; an untied head.
    "granite": (GraniteConfig, dict(attention_multiplier=0.1, embedding_multiplier=2.0, residual_multiplier=0.5,
                                    logits_scaling=4.0, tie_word_embeddings=False)),
    # A sliding layer (window 24) beside a global one, each with its attention scores capped (softcap); the
    # logits capped too.
    "gemma2": (Gemma2Config, dict(head_dim=16, sliding_window=24, attn_logit_softcapping=4.0,
                                  final_logit_softcapping=2.0, tie_word_embeddings=False)),
    # A short convolution in place of attention in its first layer, whose state the KV cache does not hold.
    "lfm2": (Lfm2Config, dict(layer_types=["conv", "full_attention"])),
    # Its attention takes no function from outside transformers.
    "stablelm": (StableLmConfig, {}),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> (folder, transformers model) of a tiny checkpoint whose norm weights and biases are
    random: transformers' ones and zeros would hide a misplaced norm or a dropped bias."""
    tokenizer, saved = build_tokenizer(), {}

    def make(name: str) -> tuple[str, torch.nn.Module]:
        if name not in saved:
            config_cls, overrides = CHECKPOINTS[name]
            path = save_tiny_model(str(tmp_path_factory.mktemp(name)), config_cls, tokenizer, **overrides)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            randomize_norms_and_biases(hf)
            hf.save_pretrained(path)
            saved[name] = path, hf
        return saved[name]

    return make


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("name", ["olmo2", "granite", "gemma2"])
def test_greedy_tokens_match_transformers(checkpoint, name):
    path, hf = checkpoint(name)
    expected = hf_greedy(hf, PROMPTS, GREEDY.max_tokens)
    # A small token budget makes the long prompts prefill in chunks next to the others' decodes.
    llm = LLM(path, **SMALL, model_impl="transformers", max_num_batched_tokens=16, max_num_seqs=4,
              enable_prefix_caching=True)
    assert isinstance(llm.llm_engine.runner.model, TransformersForCausalLM)
    assert greedy_tokens(llm, PROMPTS) == expected
    assert greedy_tokens(llm, PROMPTS) == expected   # the prompts' blocks now come from the prefix cache
    assert llm.llm_engine.block_manager.prefix_hits > 0


@pytest.mark.parametrize("name", ["olmo2", "granite", "gemma2"])
def test_logprobs_are_those_of_transformers_logits(checkpoint, name):
    """The logits, not only their order: Granite's are divided by logits_scaling after the head, Gemma 2's
    capped."""
    path, hf = checkpoint(name)
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPTS[0]])).logits[0, -1].log_softmax(-1).topk(5)
    llm = LLM(path, **SMALL, model_impl="transformers")
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    top = out[0].outputs[0].logprobs[0]
    assert set(top) >= set(expected.indices.tolist())
    got = torch.tensor([top[token].logprob for token in expected.indices.tolist()])
    torch.testing.assert_close(got, expected.values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, architecture", [("llama-tied-gqa", "LlamaForCausalLM"),
                                                ("mistral-sliding", "MistralForCausalLM")])   # a window of 24
def test_the_transformers_implementation_gives_the_native_tokens(tiny_model, caplog, name, architecture):
    path = tiny_model(name)
    options = dict(**SMALL, max_num_batched_tokens=16, max_num_seqs=4)
    with caplog.at_level(logging.INFO, logger="kvserve"):
        fallback = LLM(path, model_impl="transformers", **options)
        native = LLM(path, model_impl="vllm", **options)   # vLLM's name for the native implementation
    assert f"running the transformers implementation of {architecture}" in caplog.text
    assert f"running the native implementation of {architecture}" in caplog.text
    assert isinstance(fallback.llm_engine.runner.model, TransformersForCausalLM)
    assert greedy_tokens(fallback, PROMPTS) == greedy_tokens(native, PROMPTS)


@pytest.mark.parametrize("name, options, words", [
    ("olmo2", dict(model_impl="native"), r"\['Olmo2ForCausalLM'\] is not supported; supported: .*LlamaForCausalLM"
                                         r".*, and \(model_impl 'auto' or 'transformers'\) the causal LMs that "),
    ("olmo2", dict(model_impl="terratorch"), "model_impl must be one of auto, native, transformers, vllm, got "
                                             "'terratorch'"),
    ("olmo2", dict(quantization="int8"), "quantization='int8': the transformers implementation of Olmo2ForCausalLM "
                                         "runs unquantized weights only"),
    ("olmo2", dict(tensor_parallel_size=2), "tensor_parallel_size=2: the transformers implementation of "
                                            "Olmo2ForCausalLM does not split"),
    ("olmo2", dict(pipeline_parallel_size=2), "pipeline_parallel_size=2: the transformers implementation of "
                                              "Olmo2ForCausalLM does not split"),
    ("lfm2", {}, "Lfm2ForCausalLM calls attention in 1 of its 2 layers: the others keep state"),
    ("stablelm", {}, "StableLmForCausalLM does not take an attention implementation from outside transformers"),
])
def test_what_the_fallback_cannot_run_is_a_clear_error(checkpoint, name, options, words):
    path, _ = checkpoint(name)
    with pytest.raises(ValueError, match=words):
        LLM(path, **SMALL, **options)


@pytest.mark.parametrize("change, words", [
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
     "rope_type='dynamic' rotates by each call's longest position"),
    (dict(architectures=["Olmo2ForTokenClassification"]), "model_impl='transformers': model architecture "
                                                          r"\['Olmo2ForTokenClassification'\] is not a causal LM"),
])
def test_a_config_the_fallback_cannot_run_is_a_clear_error(checkpoint, tmp_path, change, words):
    path = shutil.copytree(checkpoint("olmo2")[0], tmp_path / "olmo2")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=words):
        LLM(str(path), **SMALL, model_impl="transformers")


def test_plugins_command_lists_the_native_architectures(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "native model architectures: " in out and "Qwen3ForCausalLM" in out
    assert "other causal LMs that transformers implements run its modeling code" in out


@pytest.mark.slow
def test_the_server_completes_with_the_fallback(checkpoint):
    path, _ = checkpoint("olmo2")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = LLM(path, **SMALL).generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].text
    server = start_server([path, "--dtype", "float32", "--kv-cache-memory", "8MiB"])
    try:
        with openai_client(server) as client:
            completion = client.completions.create(model=path, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                                   extra_body={"ignore_eos": True})
        log = server.output()
    finally:
        stop_server(server)
    assert "running the transformers implementation of Olmo2ForCausalLM" in log
    assert completion.usage.completion_tokens == 8 and completion.choices[0].text == expected
