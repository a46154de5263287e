"""GGUF files of gemma, gemma2, phi3, gpt2, gptneox, falcon and Mixtral (a llama file with experts), written from tiny random
transformers checkpoints the way llama.cpp's convert_hf_to_gguf.py writes them (gguf-py's tensor names, its metadata
keys, its q/k/v regrouping and llama's q/k permutation, the 1 it adds to Gemma's and Gemma 2's norms, GPT-2's Conv1D weights as
[out, in], each layer's experts stacked; norms, biases and routers float32, embeddings float16, every other matrix
Q8_0): kvserve reads back the checkpoint's own tensors, and its greedy tokens from the file equal transformers' from
the checkpoint, with quantization="gguf" too."""
import math
import re

import gguf
import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, EXTRA_ARCHITECTURES
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from gguf_files import add_tokenizer, llama_cpp_permute, write_gguf, write_tensors

from kvserve import LLM, SamplingParams
from kvserve.conformance.tiny_model import TINY, build_tokenizer, hf_greedy, randomize_biases
from kvserve.core.loader.gguf import iter_gguf_weights, load_gguf_config
from kvserve.core.quantization import dequantize
from kvserve.plugins.interfaces import QuantizedWeight

TOKENIZER = build_tokenizer()
# Past 64 positions: phi3-longrope's original context, where it switches to its long factors; phi3-sliding's
# window of 24 too.
PROMPT = [(37 * i + 11) % 380 + 3 for i in range(70)]
# tests/conftest.py's tiny configs of each llama.cpp architecture (not GPT-2's scale_attn_by_inverse_layer_idx, nor
# Falcon's sequential layers, which llama.cpp does not run).
CASES = {"gemma": "gemma", "gemma2": "gemma2", "phi3-sliding": "phi3", "phi3-longrope": "phi3", "gpt2": "gpt2", "gpt-neox": "gptneox",
         "gpt-neox-sequential": "gptneox", "falcon-gqa": "falcon", "falcon-multi-query": "falcon", "mixtral": "llama"}
# The matrices that quantization="gguf" keeps as blocks: not the fused tensors that kvserve splits into shards.
# llama.cpp scales Gemma 2's queries by 1/sqrt(head size), which its files do not say, and ties its head: the
# checkpoint must too.
GGUF_OVERRIDES = {"gemma2": dict(query_pre_attn_scalar=32, tie_word_embeddings=True)}
# Gemma 2's tied head on embeddings scaled by sqrt(hidden size) echoes the last token whatever attention does:
# smaller embeddings leave the tokens to attention.
EMBEDDING_SCALES = {"gemma2": 0.1}
BLOCKS = {"gemma": ("_proj.weight",), "gemma2": ("_proj.weight",), "llama": ("_proj.weight",), "phi3": ("o_proj.weight", "down_proj.weight"),
          "gpt2": ("c_proj.weight", "c_fc.weight"),
          "gptneox": ("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight"),
          "falcon": ("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight")}


@pytest.fixture(autouse=True)
def tokenizer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path / "cache"))


def stored_type(gguf_name: str, array: np.ndarray) -> QType:
    if array.ndim == 1 or gguf_name.endswith("ffn_gate_inp.weight"):
        return QType.F32
    return QType.F16 if gguf_name in ("token_embd.weight", "position_embd.weight") else QType.Q8_0


def tiny_checkpoint(case: str, folder) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A seeded transformers model of the case's config, its biases and norms random, every weight as the GGUF file
    will hold it (matrices and stacked experts as Q8_0 blocks of 32 inputs, embeddings float16, Gemma's norms as
    (1 + w) - 1 in float32); and the checkpoint it saves."""
    config_cls, overrides = {**ARCHITECTURES, **EXTRA_ARCHITECTURES}[case]
    config = config_cls(**{**TINY, "num_key_value_heads": 2, "tie_word_embeddings": True, **overrides,
                           **GGUF_OVERRIDES.get(case, {})})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.config.architectures = [type(model).__name__]
    randomize_biases(model)
    generator = torch.Generator().manual_seed(1)
    seen = set()   # a tied head's weight is the embedding's
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if weight is None or id(weight) in seen:
                continue
            seen.add(id(weight))
            if weight.ndim == 1:   # a norm; Gemma's scales by 1 + weight, which is what the file stores
                weight.uniform_(-0.5, 0.5, generator=generator)
                weight.copy_(weight + 1 - 1 if case.startswith("gemma") else weight + 1)
            elif isinstance(module, torch.nn.Embedding):
                weight.copy_((weight * EMBEDDING_SCALES.get(case, 1.0)).half().float())
            else:
                rows = weight.T if isinstance(module, Conv1D) else weight   # Q8_0 blocks run along the inputs
                blocks = gguf.quants.quantize(rows.numpy(), QType.Q8_0)
                rows.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, QType.Q8_0)))
        for experts in (p for p in model.parameters() if p.ndim == 3):   # [experts, out, in]
            experts.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(experts.numpy(), QType.Q8_0),
                                                                  QType.Q8_0)))
    model.save_pretrained(folder)
    return model, load_file(str(folder / "model.safetensors"))


def llama_cpp_qkv(w: np.ndarray, kv_heads: int, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's Falcon and GPT-NeoX (one key-value head a query head) q/k/v: each group's query
    heads, key and value head, to all query heads, then all keys, then all values."""
    groups = w.reshape(kv_heads, -1, head_dim, *w.shape[1:])
    parts = (groups[:, :-2], groups[:, -2], groups[:, -1])
    return np.concatenate([part.reshape(-1, *w.shape[1:]) for part in parts])


def stacked_experts(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """convert_hf_to_gguf.py's Mixtral experts: each layer's w1, w2 and w3 stacked over its experts, [experts, out,
    in]."""
    tensors, experts = {}, {}
    for name, tensor in checkpoint.items():
        if match := re.fullmatch(r"(.+\.experts)\.(\d+)\.(w[123]\.weight)", name):
            experts.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = tensor
        else:
            tensors[name] = tensor
    return {**tensors, **{name: torch.stack([each[i] for i in sorted(each)]) for name, each in experts.items()}}


def converted(arch: str, config, checkpoint: dict[str, torch.Tensor]) -> dict:
    """The checkpoint's tensors as llama.cpp's converter writes them: gguf name -> (array, type)."""
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], config.num_hidden_layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tensors = {}
    for name, tensor in stacked_experts(checkpoint).items():
        array = tensor.numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            array = llama_cpp_permute(array, config.num_attention_heads if "q_proj" in name else kv_heads(config))
        if arch in ("gemma", "gemma2") and name.endswith("norm.weight"):
            array = array + 1
        if arch == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            array = array.T
        if "query_key_value" in name:
            array = llama_cpp_qkv(array, kv_heads(config), head_dim)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        tensors[gguf_name] = (np.ascontiguousarray(array), stored_type(gguf_name, array))
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":
        for kind in ("long", "short"):
            tensors[f"rope_factors_{kind}.weight"] = (np.array(rope[f"{kind}_factor"], np.float32), QType.F32)
    return tensors


def write_metadata(writer: gguf.GGUFWriter, arch: str, config) -> None:
    """The keys each converter's set_gguf_parameters writes (GPT-2's and Falcon's MLP width 4 x hidden_size and
    Falcon's context 2048 whatever the checkpoint says), and the tokenizer."""
    add_tokenizer(writer, TOKENIZER, "{{ messages[0]['content'] }}")
    hidden, heads = config.hidden_size, config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(hidden)
    writer.add_head_count(heads)
    rope = getattr(config, "rope_parameters", None) or {}
    if arch in ("gemma", "gemma2", "phi3", "llama"):
        writer.add_context_length(config.max_position_embeddings)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count_kv(kv_heads(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch in ("gemma", "gemma2"):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    elif arch == "llama":   # Mixtral's
        writer.add_rope_dimension_count(config.hidden_size // heads)
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    elif arch == "phi3":
        original = rope.get("original_max_position_embeddings", config.original_max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * hidden) // heads)
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_sliding_window(config.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            scale = config.max_position_embeddings / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
    elif arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_feed_forward_length(4 * hidden)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    elif arch == "gptneox":
        writer.add_context_length(config.max_position_embeddings)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_rope_dimension_count(int(rope["partial_rotary_factor"] * (hidden // heads)))
        writer.add_parallel_residual(config.use_parallel_residual)
        writer.add_layer_norm_eps(config.layer_norm_eps)
    elif arch == "falcon":
        writer.add_context_length(2048)
        writer.add_feed_forward_length(4 * hidden)
        writer.add_head_count_kv(kv_heads(config))
        writer.add_layer_norm_eps(config.layer_norm_epsilon)


@pytest.fixture(scope="module")
def family_file(tmp_path_factory):
    """family_file(case) -> (path of its GGUF file, the transformers model, the checkpoint it saved)."""
    written = {}

    def make(case: str):
        if case not in written:
            folder, arch = tmp_path_factory.mktemp(case), CASES[case]
            model, checkpoint = tiny_checkpoint(case, folder / "hf")
            writer = gguf.GGUFWriter(str(folder / f"{arch}.gguf"), arch)
            write_metadata(writer, arch, model.config)
            written[case] = write_tensors(writer, converted(arch, model.config, checkpoint)), model, checkpoint
        return written[case]

    return make


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


@pytest.mark.parametrize("case", CASES)
def test_the_file_reads_as_the_checkpoint(family_file, case):
    path, model, checkpoint = family_file(case)
    config = load_gguf_config(path)
    assert config.architectures == model.config.architectures
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert kv_heads(config) == kv_heads(model.config)
    ours, theirs = (getattr(c, "rope_parameters", None) or {} for c in (config, model.config))
    for field in ("partial_rotary_factor", "rope_type", "rope_theta"):
        assert ours.get(field) == theirs.get(field), field
    for field in ("long_factor", "short_factor"):   # float32 tensors in the file
        assert np.array_equal(np.array(ours.get(field, []), np.float32), np.array(theirs.get(field, []), np.float32))
    for field in ("sliding_window", "layer_types", "attn_logit_softcapping", "final_logit_softcapping",
                  "query_pre_attn_scalar", "n_inner", "ffn_hidden_size", "use_parallel_residual", "new_decoder_architecture",
                  "num_ln_in_parallel_attn", "bias", "attention_bias", "original_max_position_embeddings",
                  "num_local_experts", "num_experts_per_tok"):
        if hasattr(model.config, field):
            assert getattr(config, field) == getattr(model.config, field), field
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    assert getattr(config, "head_dim", head_dim) == head_dim   # Mixtral's None: hidden_size / heads
    floats = dict(iter_gguf_weights(path))
    assert floats.keys() == checkpoint.keys()
    for name, tensor in floats.items():
        assert torch.equal(tensor, checkpoint[name]), name
    blocks = dict(iter_gguf_weights(path, quantized_blocks=True))
    quantized = {name for name, weight in blocks.items() if isinstance(weight, QuantizedWeight)}
    expected = {name for name in floats if name.endswith(BLOCKS[CASES[case]]) or name.endswith(("lm_head.weight",
                                                                                                "embed_out.weight"))}
    assert quantized == expected
    for name in quantized:   # blocks are [out, in]; GPT-2's Conv1D checkpoint weights [in, out]
        weight = floats[name].t() if CASES[case] == "gpt2" and "lm_head" not in name else floats[name]
        assert torch.equal(dequantize(blocks[name], torch.float32), weight), name


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_equal_transformers(family_file, case):
    path, model, _ = family_file(case)
    expected = hf_greedy(model, [PROMPT], 8)[0]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for quantization in (None, "gguf"):
        llm = LLM(path, dtype="float32", quantization=quantization, kv_cache_memory="8MiB")
        out = llm.generate([PROMPT], params, use_tqdm=False)
        assert list(out[0].outputs[0].token_ids) == expected, quantization


def test_unsupported_architectures_and_partial_rotary_are_named(tmp_path):
    for arch in ("bloom", "mpt"):
        with pytest.raises(ValueError, match=rf"GGUF architecture '{arch}' is not supported, supported: llama, "
                                             rf"qwen2, qwen2moe, qwen3, qwen3moe, gemma, gemma2, phi3, gpt2, gptneox, "
                                             rf"falcon, bert$"):
            load_gguf_config(write_gguf(tmp_path / f"{arch}.gguf", arch=arch))
    partial = write_gguf(tmp_path / "llama.gguf", extra=lambda writer: writer.add_rope_dimension_count(8))
    with pytest.raises(ValueError, match="llama.rope.dimension_count is 8, not the head size 16: partial rotary "
                                         "embeddings are supported for phi3, gptneox, not llama"):
        load_gguf_config(partial)
