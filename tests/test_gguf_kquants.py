"""GGUF files as users download them: K-quants, Q5_0, Q5_1 and IQ4_NL blocks (random but valid) read as the gguf
package dequantizes them and give transformers' greedy tokens, with quantization="gguf" too, where every type's
blocks run on the grouped weight-only kernel; qwen2moe, qwen3 and qwen3moe files; the tokenizer and chat template
from the file; unsupported types and architectures named."""
import dataclasses
import logging

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType
from gguf.constants import GGML_QUANT_SIZES
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from gguf_files import add_tokenizer, llama_cpp_permute, random_blocks, write_gguf

from kvserve import LLM, SamplingParams
from kvserve.conformance.tiny_model import build_tokenizer, hf_greedy
from kvserve.core.loader.gguf import iter_gguf_weights, load_gguf_config, load_gguf_tokenizer
from kvserve.core.loader.gguf_blocks import BLOCK_SCHEMES, K_QUANTS
from kvserve.core.models.registry import BUILTIN_MODELS
from kvserve.core.quantization import dequantize
from kvserve.kernels_cpu import native
from kvserve.kernels_cpu.linear import grouped_linear
from kvserve.plugins.interfaces import QuantizedWeight

TYPES = (*K_QUANTS, QType.Q5_0, QType.Q5_1, QType.IQ4_NL)
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}<s>assistant:"
PROMPT = [5, 17, 301, 44, 9, 250, 3, 88, 120, 7, 61, 372]
TOKENIZER = build_tokenizer()
VOCAB = len(TOKENIZER)
# K-quants' blocks are 256 inputs wide: every input width is a multiple of 256.
HIDDEN, FFN, HEADS, KV_HEADS = 256, 512, 4, 2


def stored_tensors(qtype: QType) -> dict:
    """A one-layer llama whose every matrix is of ``qtype``, the norms float32."""
    rng = np.random.default_rng(int(qtype))
    shapes = {"token_embd": (VOCAB, HIDDEN), "output": (VOCAB, HIDDEN), "blk.0.attn_q": (HIDDEN, HIDDEN),
              "blk.0.attn_k": (HIDDEN // 2, HIDDEN), "blk.0.attn_v": (HIDDEN // 2, HIDDEN),
              "blk.0.attn_output": (HIDDEN, HIDDEN), "blk.0.ffn_gate": (FFN, HIDDEN), "blk.0.ffn_up": (FFN, HIDDEN),
              "blk.0.ffn_down": (HIDDEN, FFN)}
    tensors = {f"{name}.weight": (random_blocks(rng, qtype, shape), qtype) for name, shape in shapes.items()}
    for norm in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        tensors[f"{norm}.weight"] = (rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32), QType.F32)
    return tensors


def with_tokenizer(writer: gguf.GGUFWriter) -> None:
    add_tokenizer(writer, TOKENIZER, CHAT_TEMPLATE)


@pytest.fixture(autouse=True)
def tokenizer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory):
    """typed_file(qtype) -> (path, the tensors it stores) of stored_tensors(qtype), with a tokenizer."""
    written = {}

    def make(qtype: QType):
        if qtype not in written:
            tensors = stored_tensors(qtype)
            path = write_gguf(tmp_path_factory.mktemp(qtype.name) / "model.gguf", "llama", tensors, with_tokenizer,
                              hidden=HIDDEN, ffn=FFN, heads=HEADS, kv_heads=KV_HEADS)
            written[qtype] = path, tensors
        return written[qtype]

    return make


def transformers_model(path: str, folder) -> torch.nn.Module:
    """transformers' model of the config and the float32 weights kvserve reads from ``path``."""
    load_gguf_config(path).save_pretrained(folder)
    weights = {name: tensor.contiguous() for name, tensor in iter_gguf_weights(path)}
    save_file(weights, str(folder / "model.safetensors"))
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def greedy(path: str, quantization: str | None = None, dtype: str = "float32") -> list[int]:
    llm = LLM(path, dtype=dtype, quantization=quantization, kv_cache_memory="8MiB")
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def kernel_dtypes() -> list[str]:
    """The model dtypes this CPU's grouped kernel takes: bfloat16 with AVX512-BF16, float32 and bfloat16 with AVX2."""
    return [dtype for dtype in ("float32", "bfloat16") if native.supported("grouped", dtype)]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_weights_are_the_gguf_packages_dequantization(typed_file, qtype):
    path, stored = typed_file(qtype)
    floats = dict(iter_gguf_weights(path))
    expected = {name: gguf.quants.dequantize(data, kind) for name, (data, kind) in stored.items()}
    # llama.cpp permutes llama's q and k rows; HF's are the other way round.
    for part, heads in (("q", HEADS), ("k", KV_HEADS)):
        ours = llama_cpp_permute(floats[f"model.layers.0.self_attn.{part}_proj.weight"].numpy(), heads)
        assert np.array_equal(ours, expected[f"blk.0.attn_{part}.weight"]), part
    for gguf_name, hf_name in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                               ("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
        assert np.array_equal(floats[hf_name].numpy(), expected[gguf_name]), hf_name
    # quantization="gguf": the linear layers' blocks stay as stored and mean exactly those floats.
    blocks = dict(iter_gguf_weights(path, quantized_blocks=True))
    assert blocks.keys() == floats.keys()
    quantized = {name for name, weight in blocks.items() if isinstance(weight, QuantizedWeight)}
    assert quantized == {name for name in floats if name.endswith(("_proj.weight", "lm_head.weight"))}
    for name, weight in blocks.items():
        if name in quantized:
            assert (weight.scheme, weight.group_size) == BLOCK_SCHEMES[qtype]
            weight = dequantize(weight, torch.float32)
        assert torch.equal(weight, floats[name]), name


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_greedy_tokens_equal_transformers_on_the_dequantized_weights(typed_file, qtype, tmp_path, caplog):
    path, _ = typed_file(qtype)
    model = transformers_model(path, tmp_path / "hf")
    # quantization="gguf": on the grouped kernel in the first dtype it takes (float32 with AVX2, bfloat16 with
    # AVX512-BF16), else in float32 on the portable reference; transformers' tokens in the same dtype (float32
    # first: the model is cast in place). Bfloat16 matmuls round differently enough to break Q2_K's near tie.
    dtypes = tuple(dict.fromkeys(("float32", *kernel_dtypes()[:1])))
    expected = {dtype: hf_greedy(model.to(getattr(torch, dtype)), [PROMPT], 8)[0] for dtype in dtypes}
    assert greedy(path) == expected["float32"]
    for dtype in dtypes:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kvserve"):
            assert greedy(path, "gguf", dtype) == expected[dtype], dtype
        on_reference = any("portable reference" in r.getMessage() for r in caplog.records)
        assert on_reference == (dtype not in kernel_dtypes()), dtype


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_blocks_run_on_the_cpu_grouped_kernel(typed_file, qtype):
    if not kernel_dtypes():
        pytest.skip("this CPU runs no grouped weight-only kernel")
    path, _ = typed_file(qtype)
    weights = [weight for _, weight in iter_gguf_weights(path, quantized_blocks=True)
               if isinstance(weight, QuantizedWeight)]
    generator = torch.Generator().manual_seed(0)
    for dtype in (getattr(torch, name) for name in kernel_dtypes()):
        for weight in weights:
            kernel = grouped_linear(dataclasses.replace(weight, dtype=dtype))
            assert kernel is not None, (dtype, weight.shape)
            inputs = torch.randn(3, weight.shape[1], generator=generator).to(dtype)
            expected = F.linear(inputs.float(), dequantize(weight, torch.float32))
            torch.testing.assert_close(kernel(inputs, None).float(), expected, rtol=2e-2, atol=2e-3)
            if dtype == torch.float32:   # one-hot rows give the kernel's weights themselves, which must be exact
                one_hot_rows = torch.eye(weight.shape[1])
                assert torch.equal(kernel(one_hot_rows, None), dequantize(weight, torch.float32).T), weight.shape


# Architectures on 64-wide tiny models: two layers, the second dense in qwen2moe (a layer without a router), 4
# experts of 32 rows, 2 chosen per token; qwen3's heads are 32 wide, not hidden / heads.
ARCHITECTURES = {"qwen2moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}
SMALL, SMALL_FFN, EXPERTS, EXPERT_FFN, SHARED_FFN = 64, 128, 4, 32, 64


def architecture_file(folder, arch: str) -> str:
    rng = np.random.default_rng(1)
    head_dim = 32 if arch.startswith("qwen3") else SMALL // HEADS

    def matrix(rows, cols, qtype=QType.Q8_0, experts=()):
        return (rng.standard_normal((*experts, rows, cols)) * 0.1).astype(np.float32), qtype

    def norm(size):
        return rng.uniform(0.8, 1.2, size).astype(np.float32), QType.F32

    tensors = {"token_embd.weight": matrix(VOCAB, SMALL, QType.F16), "output_norm.weight": norm(SMALL),
               "output.weight": matrix(VOCAB, SMALL)}
    for layer in range(2):
        blk = f"blk.{layer}"
        tensors |= {f"{blk}.attn_norm.weight": norm(SMALL), f"{blk}.ffn_norm.weight": norm(SMALL),
                    f"{blk}.attn_q.weight": matrix(HEADS * head_dim, SMALL),
                    f"{blk}.attn_k.weight": matrix(KV_HEADS * head_dim, SMALL),
                    f"{blk}.attn_v.weight": matrix(KV_HEADS * head_dim, SMALL),
                    f"{blk}.attn_output.weight": matrix(SMALL, HEADS * head_dim, QType.Q5_0)}
        if arch == "qwen2moe":
            for part, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                tensors[f"{blk}.attn_{part}.bias"] = norm(rows * head_dim)
        else:
            tensors |= {f"{blk}.attn_q_norm.weight": norm(head_dim), f"{blk}.attn_k_norm.weight": norm(head_dim)}
        if arch == "qwen3" or (arch == "qwen2moe" and layer == 1):
            tensors |= {f"{blk}.ffn_gate.weight": matrix(SMALL_FFN, SMALL, QType.Q5_1),
                        f"{blk}.ffn_up.weight": matrix(SMALL_FFN, SMALL, QType.Q5_1),
                        f"{blk}.ffn_down.weight": matrix(SMALL, SMALL_FFN, QType.Q5_0)}
            continue
        tensors |= {f"{blk}.ffn_gate_inp.weight": matrix(EXPERTS, SMALL, QType.F32),
                    f"{blk}.ffn_gate_exps.weight": matrix(EXPERT_FFN, SMALL, experts=(EXPERTS,)),
                    f"{blk}.ffn_up_exps.weight": matrix(EXPERT_FFN, SMALL, experts=(EXPERTS,)),
                    f"{blk}.ffn_down_exps.weight": matrix(SMALL, EXPERT_FFN, QType.Q5_0, experts=(EXPERTS,))}
        if arch == "qwen2moe":
            tensors |= {f"{blk}.ffn_gate_shexp.weight": matrix(SHARED_FFN, SMALL, QType.Q5_1),
                        f"{blk}.ffn_up_shexp.weight": matrix(SHARED_FFN, SMALL, QType.Q5_1),
                        f"{blk}.ffn_down_shexp.weight": matrix(SMALL, SHARED_FFN, QType.Q5_1),
                        f"{blk}.ffn_gate_inp_shexp.weight": norm(SMALL)}

    def metadata(writer: gguf.GGUFWriter) -> None:
        with_tokenizer(writer)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        if arch.endswith("moe"):
            writer.add_expert_count(EXPERTS)
            writer.add_expert_used_count(2)
            writer.add_expert_feed_forward_length(EXPERT_FFN)
        if arch == "qwen2moe":
            writer.add_expert_shared_feed_forward_length(SHARED_FFN)

    return write_gguf(folder / f"{arch}.gguf", arch, tensors, metadata, hidden=SMALL, ffn=SMALL_FFN, layers=2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architectures_load_into_transformers_and_give_its_tokens(tmp_path, arch):
    path = architecture_file(tmp_path, arch)
    config = load_gguf_config(path)
    assert config.architectures == [ARCHITECTURES[arch]] and config.head_dim == (32 if "qwen3" in arch else 16)
    if arch.endswith("moe"):
        assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (EXPERTS, 2, 32)
        assert config.mlp_only_layers == ([1] if arch == "qwen2moe" else [])
        assert config.norm_topk_prob == (arch == "qwen3moe")   # as llama.cpp weighs the chosen experts
    if arch == "qwen2moe":
        assert config.shared_expert_intermediate_size == SHARED_FFN
    expected = hf_greedy(transformers_model(path, tmp_path / "hf"), [PROMPT], 8)[0]
    if ARCHITECTURES[arch] not in BUILTIN_MODELS:
        pytest.skip(f"{ARCHITECTURES[arch]} is not in kvserve's core/models/registry.py yet")
    assert greedy(path) == expected
    assert greedy(path, "gguf") == expected


def test_tokenizer_and_chat_template_come_from_the_file(tmp_path):
    tokenizer = load_gguf_tokenizer(architecture_file(tmp_path, "qwen3"))
    text = "The quick brown fox jumps; déjà vu, 東京 🙂"
    assert tokenizer.encode(text, add_special_tokens=False) == TOKENIZER.encode(text, add_special_tokens=False)
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.chat_template == CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert prompt == "<s>user: Hi</s><s>assistant:"


def test_unsupported_types_and_architectures_are_named(tmp_path):
    iq2_xxs = np.zeros((8, GGML_QUANT_SIZES[QType.IQ2_XXS][1]), np.uint8)   # one 256-input block per row
    path = write_gguf(tmp_path / "iq2.gguf", tensors={"blk.0.ffn_up.weight": (iq2_xxs, QType.IQ2_XXS)})
    for read in (load_gguf_config, lambda path: list(iter_gguf_weights(path))):   # before a model is built
        with pytest.raises(ValueError, match=r"'blk.0.ffn_up.weight' has type IQ2_XXS, supported: F32, F16, BF16, "
                                             r"Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K$"):
            read(path)
    with pytest.raises(ValueError, match=r"GGUF architecture 'bloom' is not supported, supported: llama, qwen2, "
                                         r"qwen2moe, qwen3, qwen3moe, gemma, gemma2, phi3, gpt2, gptneox, falcon, "
                                         r"bert$"):
        load_gguf_config(write_gguf(tmp_path / "bloom.gguf", arch="bloom"))
