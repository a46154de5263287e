"""GPTQ and AWQ checkpoints: our packer (quant_packers) writes the documented layouts word for word, kvserve reads
them back to the levels, zero points and scales they hold, and checkpoints it cannot read are clear errors. That
the engine computes what transformers computes on their dequantized weights is in test_quantization.py."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

import quant_packers
from kvserve import LLM
from kvserve.core.quantization import checkpoints, int4


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
        assert (weight.scheme, weight.group_size, weight.shape) == (int4.SCHEME, 32, tuple(levels.shape))
        assert torch.equal(weight.tensors["qweight"], levels) and torch.equal(weight.tensors["zero"], zero)
        assert torch.equal(weight.tensors["scale"], scale)
        assert torch.equal(int4.groups_of_inputs(weight), g_idx)   # act-order's g_idx kept, plain groups implied


def with_quantization_config(path: str, tmp_path, **config) -> str:
    data = json.loads(open(f"{path}/config.json").read())
    data["quantization_config"] = config
    (tmp_path / "config.json").write_text(json.dumps(data))
    for other in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / other).symlink_to(f"{path}/{other}")
    return str(tmp_path)


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "bitsandbytes"}, r"method 'bitsandbytes' is not supported; supported: 'gptq', 'awq'"),
    ({"quant_method": "gptq", "bits": 8}, r"gptq checkpoints of 8 bits are not supported; supported: 4"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"},
     r"checkpoint_format='marlin' are not supported; supported: 'gptq', 'gptq_v2'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, r"version='gemv' are not supported; supported: 'gemm'"),
])
def test_checkpoints_kvserve_cannot_read_are_clear_errors(qwen2_path, tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        LLM(with_quantization_config(qwen2_path, tmp_path, **config), kv_cache_memory="8MiB")


def test_quantization_must_name_the_checkpoints_own_method(qwen2_path, tmp_path):
    path = quant_packers.write_checkpoint(qwen2_path, "awq", tmp_path / "awq")
    with pytest.raises(ValueError, match=r"holds an 'awq' quantization_config: quantization must be None or 'awq', got 'int8'"):
        LLM(path, quantization="int8", kv_cache_memory="8MiB")
    with pytest.raises(ValueError, match=r"quantization='gptq' reads a gptq checkpoint's layers; .* has no "
                                         r"quantization_config with quant_method 'gptq'"):
        LLM(qwen2_path, quantization="gptq", kv_cache_memory="8MiB")
