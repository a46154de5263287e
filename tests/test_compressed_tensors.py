"""compressed-tensors checkpoints, as AutoRound's llm_compressor export writes them through compressed-tensors
itself (llm-compressor's own pins conflict with this project's transformers), and FP8 ones (its fp8 export too):
kvserve reads each layer as the weight compressed-tensors decompresses it to, and the engine computes what
transformers computes on those weights (with W8A8's inputs rounded to their int8 or e4m3 steps, as
compressed-tensors rounds them)."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from test_quantization import rounded_to_int8_steps

from kvserve import LLM, SamplingParams
from kvserve.plugins.interfaces import QuantizedWeight
from kvserve.core.quantization import checkpoints, dequantize, fp8, int8

pytestmark = pytest.mark.slow

# (AutoRound scheme, symmetric) of each export, and the kvserve scheme its layers read as
EXPORTS = {("W4A16", True): "w4a16_int4", ("W4A16", False): "w4a16_int4", ("W8A16", True): "w8a16_int8",
           ("W8A16", False): "w8a16_int8", ("INT8_W8A8", True): "w8a8_int8", ("FP8_BLOCK", True): "w8a8_fp8",
           ("FP8_STATIC", True): "w8a8_fp8", ("FPW8A16", True): "w8a16_fp8"}
# FP8_STATIC's input scales come from calibration: a few texts (no hub here)
CALIBRATION = {"dataset": ["The quick brown fox jumps over the lazy dog. " * 8,
                           "Once upon a time there was a tiny model. " * 8] * 4, "nsamples": 8, "seqlen": 32}
PROMPT = [5, 17, 301, 44, 9, 250, 3, 88, 120, 7, 61, 372]


@pytest.fixture(scope="module")
def exports(qwen2_path, tmp_path_factory) -> dict[tuple[str, bool], str]:
    """The tiny qwen2 model quantized by AutoRound (round to nearest) and saved in its llm_compressor format."""
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AR_ALLOW_W8_ASYM", "1")   # its check is for GPTQ packings; compressed-tensors holds 8-bit zeros
        for scheme, sym in EXPORTS:
            model = AutoModelForCausalLM.from_pretrained(qwen2_path, dtype=torch.float32)
            extra = {"W4A16": {"group_size": 32}, "W8A16": {"group_size": 32}, "FP8_STATIC": CALIBRATION}
            rounder = AutoRound(model, AutoTokenizer.from_pretrained(qwen2_path), scheme=scheme, sym=sym, iters=0,
                                disable_opt_rtn=True, **extra.get(scheme, {}))
            folder = tmp_path_factory.mktemp(f"{scheme}-{'sym' if sym else 'asym'}")
            rounder.quantize_and_save(str(folder), format="llm_compressor")
            saved[scheme, sym] = str(next(folder.glob("*/config.json")).parent)
    return saved


def on_its_weights(hf: torch.nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    """The transformers model computing what the quantized layers compute: their weights, dequantized, and W8A8's
    inputs rounded to their int8 or e4m3 steps."""
    for layer, weight in quantized.items():
        hf.get_submodule(layer).weight.data = dequantize(weight, torch.float32)
        if weight.scheme == int8.SCHEME:
            hf.get_submodule(layer).register_forward_pre_hook(rounded_to_int8_steps)
        if weight.scheme == fp8.SCHEME:
            hf.get_submodule(layer).register_forward_pre_hook(
                lambda module, args, weight=weight: (fp8.fake_quantize_inputs(weight, args[0]),))


def read(path: str):
    """(kvserve's QuantizedWeight of each quantized layer, every tensor of the checkpoint)."""
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    read = checkpoints.read_quantized(tensors.items(), AutoConfig.from_pretrained(path))
    return {name.removesuffix(".weight"): weight for name, weight in read if not torch.is_tensor(weight)}, tensors


@pytest.mark.parametrize("export", list(EXPORTS), ids=lambda key: f"{key[0]}-{'sym' if key[1] else 'asym'}")
def test_layers_read_as_compressed_tensors_decompresses_them(exports, export):
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    path = exports[export]
    config = AutoConfig.from_pretrained(path).quantization_config
    (group,) = config["config_groups"].values()
    inputs = group["input_activations"]
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]),
                                input_activations=QuantizationArgs(**inputs) if inputs else None)
    compressor = BaseCompressor.get_value_from_registry(group["format"] or config["format"])
    ours, tensors = read(path)
    assert len(ours) == 14 and "lm_head" not in ours   # 2 layers of q, k, v, o, gate, up, down; the head ignored
    for layer, weight in ours.items():
        assert weight.scheme == EXPORTS[export]
        parts = {key.removeprefix(f"{layer}."): value for key, value in tensors.items()
                 if key.startswith(f"{layer}.") and not key.endswith(".bias")}
        theirs = compressor.decompress(parts, scheme)["weight"]
        assert torch.equal(dequantize(weight, torch.float32).to(theirs.dtype), theirs), layer


def test_eight_bit_gptq_and_compressed_tensors_exports_of_one_rounding_hold_the_same_weights(exports, qwen2_path,
                                                                                            tmp_path):
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen2_path, dtype=torch.float32)
    AutoRound(model, AutoTokenizer.from_pretrained(qwen2_path), scheme="W8A16", group_size=32, iters=0,
              disable_opt_rtn=True).quantize_and_save(str(tmp_path), format="auto_gptq")
    gptq, _ = read(str(next(tmp_path.glob("*/config.json")).parent))
    compressed, _ = read(exports["W8A16", True])
    assert gptq.keys() == compressed.keys()
    for layer, weight in gptq.items():
        assert weight.scheme == "w8a16_int8"
        assert torch.equal(dequantize(weight, torch.float32), dequantize(compressed[layer], torch.float32)), layer


@pytest.mark.parametrize("export", list(EXPORTS), ids=lambda key: f"{key[0]}-{'sym' if key[1] else 'asym'}")
def test_the_engine_computes_what_transformers_computes_on_the_weights(exports, hf_model, export):
    path = exports[export]
    out = LLM(path, dtype="float32", kv_cache_memory="8MiB").generate(
        [PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    hf = copy.deepcopy(hf_model("qwen2"))
    on_its_weights(hf, read(path)[0])
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT])).logits[0].log_softmax(-1)
    ours = [next(iter(entry.values())).logprob for entry in out.prompt_logprobs[1:]]
    assert ours == pytest.approx([expected[i - 1, token].item() for i, token in enumerate(PROMPT) if i > 0], abs=1e-3)


def test_fp8_exports_of_one_rounding_hold_the_same_weights(exports, qwen2_path, tmp_path):
    # AutoRound's fp8 format (quant_method "fp8", weight_scale_inv per block) and its llm_compressor FP8_BLOCK.
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen2_path, dtype=torch.float32)
    AutoRound(model, AutoTokenizer.from_pretrained(qwen2_path), scheme="FP8_BLOCK", iters=0,
              disable_opt_rtn=True).quantize_and_save(str(tmp_path), format="fp8")
    plain, _ = read(str(next(tmp_path.glob("*/config.json")).parent))
    compressed, _ = read(exports["FP8_BLOCK", True])
    assert plain.keys() == compressed.keys()
    for layer, weight in plain.items():
        assert (weight.scheme, weight.group_size) == (fp8.SCHEME, 128)
        assert torch.equal(dequantize(weight, torch.float32), dequantize(compressed[layer], torch.float32)), layer


@pytest.mark.parametrize("inputs", [{"strategy": "token", "dynamic": True},
                                    {"strategy": "group", "group_size": 32, "dynamic": True},
                                    {"strategy": "tensor", "dynamic": False}])
def test_fp8_inputs_round_as_compressed_tensors_rounds_them(inputs):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    torch.manual_seed(0)
    x = torch.randn(1, 5, 96) * torch.logspace(-3, 1, 96)   # a token's inputs of many magnitudes
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, **inputs)
    weight = fp8.quantize_weight(torch.randn(8, 96))
    if inputs["strategy"] == "group":   # blocks of 32: inputs in groups of 32
        weight = QuantizedWeight(fp8.SCHEME, {**weight.tensors, "scale": torch.ones(8, 3)}, weight.shape, 32)
    if inputs["dynamic"]:
        scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None)
    else:
        scale, zero_point = x.abs().amax().reshape(1) / 300, torch.zeros(1)   # some inputs beyond the range
        weight = QuantizedWeight(fp8.SCHEME, {**weight.tensors, "input_scale": scale.reshape(())}, weight.shape)
    expected = fake_quantize(x, scale, zero_point, args)
    assert torch.equal(fp8.fake_quantize_inputs(weight, x), expected)
