"""Rope scaling as transformers defines it (linear, dynamic, yarn, longrope, llama3) on every native family: greedy
tokens identical to transformers' in float32 on prompts longer than the original context, and a max_model_len up to
the context the scaling stretches to.

transformers picks dynamic's base and longrope's factors in each forward call, from the call's longest position;
kvserve rotates a position the same way in every sequence, with those of the longest sequence the model takes (see
kvserve.core.layers.rotary). They agree for longrope on prompts longer than the original context, which transformers
rotates with the long factors throughout, and for dynamic on one transformers forward over the whole context.
transformers' generate cannot agree with a KV cache of dynamic keys: each step past the original context rotates
the new token with a larger base than the keys it attends to."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from conftest import ARCHITECTURES, EXTRA_ARCHITECTURES
from kvserve import LLM, SamplingParams
from kvserve.conformance.tiny_model import TINY, build_tokenizer, hf_greedy, save_tiny_model
from kvserve.core.layers.rotary import attention_scaling, inverse_frequencies, rope_parameters
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.models.llama import head_size_of

ORIGINAL = 64   # the original context of every case: the long prompts run past it
FAMILIES = {name: ARCHITECTURES[arch] for name, arch in [
    ("llama", "llama-tied-gqa"), ("mistral", "mistral-sliding"), ("qwen2", "qwen2"), ("mixtral", "mixtral"),
    ("qwen2-moe", "qwen2-moe")]} | {name: EXTRA_ARCHITECTURES[name] for name in ("qwen3", "qwen3-moe")}
SHORT_FACTORS = [1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5]
LONG_FACTORS = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0]
# name: (family, max_position_embeddings, rope_parameters, the context the scaling stretches to)
CASES = {
    "llama-dynamic": ("llama", ORIGINAL, {"rope_type": "dynamic", "factor": 2.0}, 128),
    "qwen3-moe-dynamic": ("qwen3-moe", ORIGINAL, {"rope_type": "dynamic", "factor": 3.0}, 192),
    "mistral-linear": ("mistral", ORIGINAL, {"rope_type": "linear", "factor": 4.0}, 256),
    "qwen2-yarn": ("qwen2", ORIGINAL, {"rope_type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": ORIGINAL}, 256),
    "qwen2-moe-yarn-tuned": ("qwen2-moe", ORIGINAL, {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 8.0,
        "beta_slow": 2.0, "truncate": False, "attention_factor": 1.2}, 256),
    # Its max_position_embeddings is already the stretched context, and its factor the ratio (factor left out).
    "qwen3-yarn-mscale": ("qwen3", 256, {"rope_type": "yarn", "factor": None, "mscale": 1.0, "mscale_all_dim": 0.5,
                                         "original_max_position_embeddings": ORIGINAL}, 256),
    # Phi-3 style: the factor is the ratio of max_position_embeddings to the original context.
    "llama-longrope": ("llama", 256, {"rope_type": "longrope", "original_max_position_embeddings": ORIGINAL,
                                      "short_factor": SHORT_FACTORS, "long_factor": LONG_FACTORS}, 256),
    "mixtral-longrope": ("mixtral", ORIGINAL, {"rope_type": "longrope", "factor": 4.0,
                                               "original_max_position_embeddings": ORIGINAL,
                                               "short_factor": SHORT_FACTORS, "long_factor": LONG_FACTORS}, 256),
    "llama-llama3": ("llama", 256, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL}, 256),
}
LONG_PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Paged attention stores keys and values in blocks. Continuous "
    "batching lets new requests join while others decode; déjà vu, naïve café, 東京.",
    "Rotary embeddings stretched past the original context: a long prompt, a longer answer, and every key kept in "
    "the cache for the step after. Once upon a time there was a tiny model.",
]
SHORT_PROMPT = "Once upon a time"
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(case) -> folder of the case's tiny random-weight checkpoint, saved by transformers."""
    built: dict[str, str] = {}
    tokenizer = build_tokenizer()

    def make(case: str) -> str:
        if case not in built:
            family, max_position, rope, _ = CASES[case]
            config_cls, extra = FAMILIES[family]
            # transformers' dynamic, yarn and longrope read config.head_dim, which MixtralConfig leaves None.
            extra = {"head_dim": TINY["hidden_size"] // TINY["num_attention_heads"], **extra}
            extra = {**extra, "sliding_window": None} if family == "mistral" else extra
            built[case] = save_tiny_model(str(tmp_path_factory.mktemp(case)), config_cls, tokenizer, **extra,
                                          max_position_embeddings=max_position, rope_parameters=dict(rope))
        return built[case]

    return make


def kvserve_greedy(path: str, context: int, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """kvserve's greedy tokens, with the max_model_len the checkpoint's rope scaling gives, ``context``."""
    # A small token budget makes the long prompts prefill in chunks, next to the others' decodes.
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=32, max_num_seqs=4)
    assert llm.llm_engine.max_model_len == context
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_rotary_table_is_transformers(checkpoint, case):
    """The frequencies and the cos/sin scaling of transformers' ROPE_INIT_FUNCTIONS, to the bit, for the longest
    sequence; and that sequence is the checkpoint's max_model_len."""
    loaded = Checkpoint.open(checkpoint(case))
    config, context = loaded.hf_config, CASES[case][3]
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    seq_len = torch.tensor(context) if rope_type == "dynamic" else context
    expected, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)
    torch.testing.assert_close(inverse_frequencies(head_size_of(config), params), expected, rtol=0, atol=0)
    assert attention_scaling(params) == scaling
    assert loaded.max_model_len == context > ORIGINAL


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c][2]["rope_type"] != "dynamic"))
def test_greedy_matches_transformers_past_the_original_context(checkpoint, case):
    path = checkpoint(case)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(text)["input_ids"] for text in LONG_PROMPTS]
    assert all(ORIGINAL < len(ids) < CASES[case][3] - GREEDY.max_tokens for ids in prompts)
    if CASES[case][2]["rope_type"] != "longrope":   # longrope shares transformers' factors only past the original
        prompts.append(tokenizer(SHORT_PROMPT)["input_ids"])
    expected = hf_greedy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), prompts, GREEDY.max_tokens)
    assert kvserve_greedy(path, CASES[case][3], prompts, GREEDY) == expected


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c][2]["rope_type"] == "dynamic"))
def test_dynamic_greedy_matches_one_transformers_forward_over_the_whole_context(checkpoint, case):
    """kvserve fills the whole context from a prompt past the original one; transformers, given that whole
    sequence in one forward, scales its base for the same length and picks the same token at every position."""
    path, context = checkpoint(case), CASES[case][3]
    prompt = AutoTokenizer.from_pretrained(path)(LONG_PROMPTS[0])["input_ids"]
    assert ORIGINAL < len(prompt) < context
    whole_context = SamplingParams(temperature=0, max_tokens=context, ignore_eos=True)
    output = kvserve_greedy(path, context, [prompt], whole_context)[0]
    sequence = prompt + output
    assert len(sequence) == context
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([sequence])).logits[0]
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == output


def test_max_model_len_is_bounded_by_the_scaled_context(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"max_model_len=257 exceeds the model's context length 256; "
                                         r"allowed: 1\.\.256"):
        LLM(checkpoint("qwen2-yarn"), dtype="float32", kv_cache_memory="8MiB", max_model_len=257)
    unscaled = save_tiny_model(str(tmp_path / "unscaled"), LlamaConfig, max_position_embeddings=ORIGINAL)
    with pytest.raises(ValueError, match=r"max_model_len=65 exceeds the model's context length 64; allowed: 1\.\.64"):
        LLM(unscaled, dtype="float32", kv_cache_memory="8MiB", max_model_len=65)


def test_unsupported_rope_type_is_a_value_error(tmp_path):
    path = save_tiny_model(str(tmp_path / "proportional"), LlamaConfig,
                           rope_parameters={"rope_type": "proportional", "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="rope_type='proportional' is not supported; supported: default, linear, "
                                         "dynamic, yarn, longrope, llama3"):
        LLM(path, dtype="float32", kv_cache_memory="8MiB")
