"""GPTQ, AWQ and AutoRound checkpoints: our packer (quant_packers) writes the documented layouts word for word and
kvserve reads them back to the levels, zero points and scales they hold; AutoRound's own exports (GPTQ and AWQ
packings) read as the weights AutoRound means, and run as transformers runs those weights; checkpoints kvserve
cannot read are clear errors. The packer's checkpoints on the engine are in test_quantization.py."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

import quant_packers
from kvserve import LLM, SamplingParams
from kvserve.core.quantization import checkpoints, dequantize, grouped

pytestmark = pytest.mark.slow


def test_packed_words_follow_the_documented_layouts():
    # Output 0's inputs 0-7 (GPTQ packs inputs) and input 0's outputs 0-7 (AWQ packs outputs) hold levels 1-8.
    levels = torch.zeros(8, 32, dtype=torch.uint8)
    levels[0, :8] = levels[:, 0] = torch.arange(1, 9, dtype=torch.uint8)
    zero = torch.arange(1, 9, dtype=torch.uint8)[:, None]   # one group: outputs 0-7 have zero points 1-8
    scale = torch.ones(8, 1, dtype=torch.float16)
    gptq = quant_packers.pack_gptq(levels, zero, scale, torch.zeros(32, dtype=torch.int32))
    word = lambda packed: packed[0, 0].item() & 0xFFFFFFFF   # noqa: E731 (the int32's bits)
    assert word(gptq["qweight"]) == 0x87654321   # input j in bits 4j
    assert word(gptq["qzeros"]) == 0x76543210    # output j's zero point minus one in bits 4j
    awq = quant_packers.pack_awq(levels, zero, scale)
    assert word(awq["qweight"]) == word(awq["qzeros"]) == 0x86427531   # outputs 0, 2, 4, 6, 1, 3, 5, 7 in bits 0, 4, ..
    gptq8 = quant_packers.pack_gptq(levels, zero, scale, torch.zeros(32, dtype=torch.int32), bits=8)
    assert word(gptq8["qweight"]) == 0x04030201 and word(gptq8["qzeros"]) == 0x03020100   # 8 bits each, 4 a word


@pytest.mark.parametrize("name", list(quant_packers.FORMATS))
def test_a_checkpoint_reads_back_as_the_levels_it_holds(qwen2_path, tmp_path, name):
    path = quant_packers.write_checkpoint(qwen2_path, name, tmp_path / name)
    config = AutoConfig.from_pretrained(path)
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        read = dict(checkpoints.read_quantized(((key, f.get_tensor(key)) for key in f.keys()), config))
    layers = quant_packers.quantized_layers(qwen2_path, name)
    assert {key.removesuffix(".weight") for key, value in read.items() if not torch.is_tensor(value)} == set(layers)
    for layer, (levels, zero, scale, g_idx) in layers.items():
        weight = read[f"{layer}.weight"]
        _, _, bits, group_size = quant_packers.FORMATS[name]
        group_size = levels.shape[1] if group_size == -1 else group_size
        assert (weight.scheme, weight.group_size, weight.shape) == (grouped.SCHEME_OF_BITS[bits], group_size,
                                                                    tuple(levels.shape))
        assert torch.equal(weight.tensors["qweight"], levels) and torch.equal(weight.tensors["zero"], zero)
        assert torch.equal(weight.tensors["scale"], scale)
        assert torch.equal(grouped.groups_of_inputs(weight), g_idx)   # act-order's g_idx kept, plain groups implied


def with_quantization_config(path: str, tmp_path, **config) -> str:
    data = json.loads(open(f"{path}/config.json").read())
    data["quantization_config"] = config
    (tmp_path / "config.json").write_text(json.dumps(data))
    for other in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / other).symlink_to(f"{path}/{other}")
    return str(tmp_path)


CT_W4A16 = {"targets": ["Linear"], "weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 32,
                                            "symmetric": True}}


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "bitsandbytes"},
     r"method 'bitsandbytes' is not supported; supported: 'gptq', 'awq', 'auto-round', 'compressed-tensors', "
     r"'fp8'"),
    ({"quant_method": "auto-round", "bits": 4, "data_type": "nv_fp"},
     r"data_type='nv_fp' are not supported; supported: 'int'"),
    ({"quant_method": "auto-round", "bits": 4, "packing_format": "auto_round:llm_compressor"},
     r"packing_format='auto_round:llm_compressor' are not supported; supported: 'auto_round:auto_gptq', "
     r"'auto_round:auto_awq'"),
    ({"quant_method": "gptq", "bits": 3}, r"gptq checkpoints of 3 bits are not supported; supported: 4, 8"),
    ({"quant_method": "awq", "bits": 8}, r"awq checkpoints of 8 bits are not supported; supported: 4"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"},
     r"checkpoint_format='marlin' are not supported; supported: 'gptq', 'gptq_v2'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, r"version='gemv' are not supported; supported: 'gemm'"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24", "config_groups": {"group_0": CT_W4A16}},
     r"compressed-tensors checkpoints with format='marlin-24' are not supported; supported: 'pack-quantized', "
     r"'int-quantized', 'float-quantized', 'naive-quantized'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {**CT_W4A16, "weights": {**CT_W4A16["weights"], "num_bits": 3}}}},
     r"weights.num_bits=3 are not supported; supported: 4, 8"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
        **CT_W4A16, "weights": {"type": "int", "num_bits": 8, "strategy": "channel", "symmetric": True},
        "input_activations": {"type": "int", "num_bits": 8, "strategy": "tensor", "dynamic": False}}}},
     r"input_activations .* are not supported; supported: none \(weight-only\), or with int-quantized 8-bit weights"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": CT_W4A16},
      "kv_cache_scheme": {"type": "int", "num_bits": 8, "dynamic": False}},
     r"compressed-tensors kv_cache_scheme .* is not supported; supported: static FP8 scales \(type 'float', "
     r"num_bits 8, dynamic false\), used with kv_cache_dtype='fp8'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
        "input_activations": {"type": "float", "num_bits": 8, "strategy": "group", "group_size": 64,
                              "dynamic": True}}}},
     r"FP8 input_activations .* are not supported with channel weights; supported: none \(weight-only\)"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
        **CT_W4A16, "weights": {"type": "int", "num_bits": 8, "strategy": "group", "group_size": 32},
        "input_activations": {"type": "int", "num_bits": 8, "strategy": "token", "dynamic": True,
                              "symmetric": True}}}},
     r"W8A8 checkpoints with symmetric=True group weights are not supported; supported: symmetric, per channel"),
    ({"quant_method": "fp8", "activation_scheme": "per-block"},
     r"fp8 checkpoints with activation_scheme='per-block' are not supported; supported: 'dynamic', 'static'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 64]},
     r"weight_block_size=\[128, 64\] .* supported: square blocks with dynamic activations"),
])
def test_checkpoints_kvserve_cannot_read_are_clear_errors(qwen2_path, tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        LLM(with_quantization_config(qwen2_path, tmp_path, **config), kv_cache_memory="8MiB")


def test_a_quantized_tensor_for_a_layer_that_is_not_linear_is_a_clear_error(qwen2_path, tmp_path):
    path = quant_packers.write_checkpoint(qwen2_path, "gptq", tmp_path / "gptq")
    tensors = load_file(f"{path}/model.safetensors")
    layer = "model.layers.0.self_attn.q_proj"
    tensors.update({f"model.embed_tokens.{part}": tensors[f"{layer}.{part}"].clone()
                    for part in ("qweight", "qzeros", "scales")})
    save_file(tensors, f"{path}/model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'model.embed_tokens.weight' is quantized, but Qwen2ForCausalLM has "
                                         r"no linear layer 'model.embed_tokens' to hold it"):
        LLM(path, kv_cache_memory="8MiB")


def test_quantization_must_name_the_checkpoints_own_method(qwen2_path, tmp_path):
    path = quant_packers.write_checkpoint(qwen2_path, "awq", tmp_path / "awq")
    with pytest.raises(ValueError, match=r"holds an 'awq' quantization_config: quantization must be None or 'awq', "
                                         r"got 'int8'"):
        LLM(path, quantization="int8", kv_cache_memory="8MiB")
    with pytest.raises(ValueError, match=r"quantization='gptq' reads a gptq checkpoint's layers; .* has no "
                                         r"quantization_config with quant_method 'gptq'"):
        LLM(qwen2_path, quantization="gptq", kv_cache_memory="8MiB")


# (format, symmetric) -> where AutoRound saved it: each export of the same rounding, in the GPTQ or AWQ packing.
AUTO_ROUND_EXPORTS = [("auto_round", True), ("auto_gptq", True), ("auto_round", False), ("auto_gptq", False),
                      ("auto_awq", False)]


@pytest.fixture(scope="module")
def auto_round_exports(qwen2_path, tmp_path_factory) -> dict[tuple[str, bool], str]:
    """The tiny qwen2 model quantized by AutoRound itself (round to nearest: no calibration data), saved in each of
    its export formats."""
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exports = {}
    for export_format, sym in AUTO_ROUND_EXPORTS:
        model = AutoModelForCausalLM.from_pretrained(qwen2_path, dtype=torch.float32)
        rounder = AutoRound(model, AutoTokenizer.from_pretrained(qwen2_path), bits=4, group_size=32, sym=sym, iters=0,
                            disable_opt_rtn=True)
        folder = tmp_path_factory.mktemp(f"{export_format}-{'sym' if sym else 'asym'}")
        rounder.quantize_and_save(str(folder), format=export_format)
        exports[export_format, sym] = str(next(folder.glob("*/config.json")).parent)
    return exports


def read_layers(path: str) -> dict[str, torch.Tensor]:
    """Each quantized layer's weight, dequantized, as kvserve reads the checkpoint."""
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        tensors = ((key, f.get_tensor(key)) for key in f.keys())
        read = checkpoints.read_quantized(tensors, AutoConfig.from_pretrained(path))
        return {name.removesuffix(".weight"): dequantize(weight, torch.float32)
                for name, weight in read if not torch.is_tensor(weight)}


def test_auto_round_exports_read_as_autorounds_own_dequantized_weights(auto_round_exports):
    from transformers import AutoModelForCausalLM

    # AutoRound's own layers (loaded by transformers through AutoRound's CPU backend, in float16) applied to the
    # identity matrix give the weights it means (plus the bias, added in float16).
    path = auto_round_exports["auto_round", True]
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu").eval()
    ours = read_layers(path)
    assert len(ours) == 14   # 2 layers of q, k, v, o, gate, up, down
    for name, weight in ours.items():
        layer = model.get_submodule(name)
        with torch.no_grad():
            theirs = layer(torch.eye(weight.shape[1], dtype=torch.float16))
        expected = weight.T.half() + (layer.bias.half() if layer.bias is not None else 0)
        assert torch.equal(theirs, expected), name
    # Every export of the same rounding holds the same weights, whichever packing it uses.
    for sym in (True, False):
        layers = [read_layers(auto_round_exports[key]) for key in AUTO_ROUND_EXPORTS if key[1] == sym]
        for other in layers[1:]:
            assert other.keys() == layers[0].keys()
            assert all(torch.equal(other[name], layers[0][name]) for name in other)


@pytest.mark.parametrize("export", AUTO_ROUND_EXPORTS, ids=lambda key: f"{key[0]}-{'sym' if key[1] else 'asym'}")
def test_auto_round_exports_compute_what_transformers_computes_on_their_weights(auto_round_exports, hf_model,
                                                                                export):
    path, prompt = auto_round_exports[export], [5, 17, 301, 44, 9, 250, 3, 88, 120, 7, 61, 372]
    out = LLM(path, dtype="float32", kv_cache_memory="8MiB").generate(
        [prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    hf = copy.deepcopy(hf_model("qwen2"))
    for name, weight in read_layers(path).items():
        hf.get_submodule(name).weight.data = weight
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
    ours = [next(iter(entry.values())).logprob for entry in out.prompt_logprobs[1:]]
    assert ours == pytest.approx([expected[i - 1, token].item() for i, token in enumerate(prompt) if i > 0], abs=1e-3)


def test_the_load_line_counts_the_quantized_tensors_as_read(qwen2_path, tmp_path):
    path = quant_packers.write_checkpoint(qwen2_path, "gptq", tmp_path / "gptq")
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        read = dict(checkpoints.read_quantized(((key, f.get_tensor(key)) for key in f.keys()),
                                               AutoConfig.from_pretrained(path)))
    as_read = sum(value.float().nbytes if torch.is_tensor(value) else sum(t.nbytes for t in value.tensors.values())
                  for value in read.values())
    runner = LLM(path, dtype="float32", kv_cache_memory="8MiB").llm_engine.runner
    assert runner.built.weight_bytes == as_read
