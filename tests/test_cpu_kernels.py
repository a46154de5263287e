"""The CPU platform's compiled fused ops agree with the torch references they replace."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kvserve.conformance.ops import (TOLERANCE, check_add_rms_norm, check_argmax, check_rms_norm,
                                     check_rotary_on_strided_views, check_silu_and_mul)
from kvserve.core.quantization import dequantize, fp8, grouped, int4
from kvserve.core.quantization.int8 import quantize_weight, reference_kernel
from kvserve.kernels_cpu import native
from kvserve.kernels_cpu.linear import fp8_linear, gate_up_linear, grouped_linear, int8_linear, packed_linear
from kvserve.plugins.interfaces import QuantizedWeight

pytestmark = pytest.mark.skipif(native.load()[0] is None, reason=f"native kernels unavailable: {native.load()[1]}")
CPU = torch.device("cpu")
AMX = "AMX" in native.isa("bf16")


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def dtype(request):
    torch.manual_seed(0)
    return request.param


def test_rms_norm(dtype):
    check_rms_norm(native.FUSED_OPS, dtype, CPU)
    check_add_rms_norm(native.FUSED_OPS, dtype, CPU)


def test_silu_and_mul(dtype):
    check_silu_and_mul(native.FUSED_OPS, dtype, CPU)


@pytest.mark.parametrize("head_size, rotary_dim", [(64, 64), (24, 16)])
def test_rotary_embedding_on_strided_views(dtype, head_size, rotary_dim):
    check_rotary_on_strided_views(native.FUSED_OPS, dtype, CPU, head_size, rotary_dim)


def test_argmax():
    check_argmax(native.FUSED_OPS, CPU)
    assert native.argmax(torch.randn(3, 4, 5)).shape == (3, 4)   # other shapes keep torch's


def test_platform_uses_fused_ops():
    from kvserve.plugins.manager import PluginManager

    assert PluginManager().select_platform("cpu").ops() == native.FUSED_OPS


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("in_features", [64, 63])   # an odd width takes oneDNN's kernel in bfloat16 too
def test_packed_linear_matches_torch(dtype, with_bias, in_features):

    weight, x = torch.randn(96, in_features, dtype=dtype), torch.randn(3, 5, in_features, dtype=dtype)
    bias = torch.randn(96, dtype=dtype) if with_bias else None
    kernel = packed_linear(weight)
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert kernel is None   # oneDNN's bfloat16 path needs AVX-512: torch's linear instead
        return
    for rows in (x[0, :1], x):   # one row (a single decode) and a batch of any shape
        torch.testing.assert_close(kernel(rows, bias), torch.nn.functional.linear(rows, weight, bias),
                                   **TOLERANCE[dtype])
    assert packed_linear(weight.half()) is None   # float16 keeps torch's linear


@pytest.mark.skipif(not native.supported("bf16"), reason="the bfloat16 linear kernel needs a CPU with AVX512-BF16")
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 300])   # tiles of 8 rows, and more than one 256-row group
@pytest.mark.parametrize("out_features", [16, 40, 97])   # whole and partial blocks of 16 outputs
def test_linear_bf16_tiles_and_tails(rows, out_features):
    ops = native.load("bf16")[0]
    torch.manual_seed(rows * out_features)
    weight, bias = torch.randn(out_features, 72, dtype=torch.bfloat16), torch.randn(out_features, dtype=torch.bfloat16)
    x = torch.randn(2, rows, 100, dtype=torch.bfloat16)[..., :72]   # rows further apart than their width
    packed = ops.pack_linear_bf16(weight)
    expected = x.float() @ weight.float().T
    linear_bf16 = ops.linear_bf16.default
    torch.testing.assert_close(linear_bf16(x, packed, None, out_features), expected.bfloat16(),
                               **TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(linear_bf16(x, packed, bias, out_features), (expected + bias.float()).bfloat16(),
                               **TOLERANCE[torch.bfloat16])


def test_the_bfloat16_kernel_uses_amx_where_the_cpu_has_it():
    with open("/proc/cpuinfo") as f:
        has_amx = "amx_bf16" in f.read().split()
    assert AMX == (has_amx and native.supported("bf16"))


@pytest.mark.skipif(not AMX, reason="AMX tiles need a CPU with AMX-BF16")
@pytest.mark.parametrize("rows", [16, 17, 33, 300])   # one tile of rows, a row past it, a second tile's, groups
@pytest.mark.parametrize("out_features", [16, 40, 97])   # whole and partial blocks, and a lone last block
@pytest.mark.parametrize("in_features", [32, 96, 576])
def test_linear_bf16_on_amx_tiles(rows, out_features, in_features):
    """From 16 rows on, with inputs a multiple of 32 wide, the kernel runs on AMX tiles (fewer rows, or other
    widths, on AVX512: the test above)."""
    ops = native.load("bf16")[0]
    torch.manual_seed(rows * out_features + in_features)
    weight, bias = (torch.randn(out_features, in_features, dtype=torch.bfloat16),
                    torch.randn(out_features, dtype=torch.bfloat16))
    x = torch.randn(rows, in_features + 8, dtype=torch.bfloat16)[:, :in_features]
    packed, expected = ops.pack_linear_bf16(weight), x.float() @ weight.float().T
    for b, want in ((None, expected), (bias, expected + bias.float())):
        torch.testing.assert_close(ops.linear_bf16.default(x, packed, b, out_features), want.bfloat16(),
                                   **TOLERANCE[torch.bfloat16])


@pytest.mark.skipif(not native.supported("bf16"), reason="the bfloat16 linear kernel needs a CPU with AVX512-BF16")
@pytest.mark.parametrize("rows", [1, 8, 13, 300])
@pytest.mark.parametrize("in_features", [72, 96])   # AVX512 only; AMX from 16 rows on
@pytest.mark.parametrize("intermediate", [16, 48])   # one and three blocks of gate outputs
def test_gate_up_kernel_equals_the_matmul_then_silu_and_mul(rows, in_features, intermediate):
    torch.manual_seed(rows + intermediate)
    weight = torch.randn(2 * intermediate, in_features, dtype=torch.bfloat16)
    bias = torch.randn(2 * intermediate, dtype=torch.bfloat16)
    x = torch.randn(2, rows, 100, dtype=torch.bfloat16)[..., :in_features]
    fused, matmul = gate_up_linear(weight), packed_linear(weight)
    for b in (None, bias):   # the same roundings: equal bit for bit
        assert torch.equal(fused(x, b), native.silu_and_mul(matmul(x, b)))
    for unfusable in (weight[2:], weight.float()):   # an intermediate size not a multiple of 16; not bfloat16
        assert gate_up_linear(unfusable) is None


@pytest.mark.skipif(not native.supported("int8"), reason="the int8 linear kernel needs a CPU with AVX512-VNNI or AVX2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 5, 8, 300])
@pytest.mark.parametrize("out_features,in_features", [(16, 64), (40, 70), (97, 9)])   # partial blocks and quads
def test_linear_int8_equals_the_w8a8_reference(dtype, rows, out_features, in_features):
    torch.manual_seed(rows + out_features)
    weight = quantize_weight(torch.randn(out_features, in_features))
    weight.tensors["qweight"][0, :5] = -128   # compressed-tensors' symmetric int8 reaches it
    bias = torch.randn(out_features, dtype=dtype)
    x = torch.randn(2, rows, in_features + 11, dtype=dtype)[..., :in_features] * 4
    x[0, 0] = 0   # a row of zeros
    kernel, reference = int8_linear(weight.tensors["qweight"], weight.tensors["scale"]), reference_kernel(weight)
    for b in (None, bias):
        torch.testing.assert_close(kernel(x, b), reference(x, b), **TOLERANCE[dtype])


@pytest.mark.skipif("AMX" not in native.isa("int8"), reason="AMX tiles need a CPU with AMX-INT8")
@pytest.mark.parametrize("rows", [16, 17, 33, 300])   # one tile of rows, a row past it, a second tile's, groups
@pytest.mark.parametrize("out_features", [16, 40, 97])   # whole and partial blocks, and a lone last block
@pytest.mark.parametrize("in_features", [64, 576])
def test_linear_int8_on_amx_tiles_sums_as_avx512_vnni_does(rows, out_features, in_features):
    """From 16 rows on, with inputs a multiple of 64 wide, the int8 kernel runs on AMX tiles; their integer sums
    are those of one row at a time on AVX512-VNNI, so the outputs are equal bit for bit."""
    torch.manual_seed(rows * out_features + in_features)
    weight = quantize_weight(torch.randn(out_features, in_features))
    kernel, bias = int8_linear(weight.tensors["qweight"], weight.tensors["scale"]), torch.randn(out_features)
    x = torch.randn(rows, in_features + 8, dtype=torch.bfloat16)[:, :in_features]
    for b in (None, bias):
        one_at_a_time = torch.cat([kernel(x[i:i + 1], b) for i in range(rows)])
        assert torch.equal(kernel(x, b), one_at_a_time)
        torch.testing.assert_close(kernel(x, b), reference_kernel(weight)(x, b), **TOLERANCE[torch.bfloat16])


def grouped_kernel_takes(dtype: torch.dtype) -> bool:
    return native.supported("grouped", str(dtype)[6:])


def k_quant_like(values: torch.Tensor) -> torch.Tensor:
    """Numbers near ``values`` made as GGUF K-quants make scales and minimums, a float16 d times an integer
    sub-scale (of 7 bits, as Q6_K's): exact in float32, mostly not in float16."""
    d = (values.float() / 112).half().float()
    return d * torch.randint(96, 128, values.shape)


def grouped_weight(variant: str, bits: int, out_features: int, in_features: int, group_size: int,
                   dtype: torch.dtype) -> QuantizedWeight:
    """A grouped weight of the layout ``variant`` names: "offset" (Q4_1-like, float16 scales and offsets), "zero"
    (GPTQ/AWQ), "zero+g_idx" (GPTQ act-order), "zero+bf16" (compressed-tensors: int32 zero points, bfloat16 scales),
    "offset+f32" and "zero+f32" (GGUF K-quants: float32 scales and offsets)."""
    weight = int4.quantize_weight(torch.randn(out_features, in_features) * 0.1, group_size)   # 160: a short group
    weight = dataclasses.replace(weight, dtype=dtype)
    groups, top = -(-in_features // group_size), (1 << bits) - 1
    if bits == 8:   # levels over the whole byte, at a sixteenth of the int4 step
        weight = dataclasses.replace(weight, scheme="w8a16_int8", tensors={
            **weight.tensors, "qweight": torch.randint(0, top + 1, (out_features, in_features), dtype=torch.uint8),
            "scale": weight.tensors["scale"] / 16})
    tensors = weight.tensors
    if variant.startswith("zero"):
        tensors = {"qweight": tensors["qweight"], "scale": tensors["scale"],
                   "zero": torch.randint(0, top + 2, (out_features, groups))}   # GPTQ's zero minus one, plus one
        if variant == "zero+g_idx":
            tensors["g_idx"] = (torch.arange(in_features) // group_size)[torch.randperm(in_features)].int()
        if variant == "zero+bf16":
            tensors.update(scale=tensors["scale"].bfloat16(), zero=tensors["zero"].int())
    if variant.endswith("+f32"):
        tensors = {**tensors, **{key: k_quant_like(tensors[key]) for key in ("scale", "offset") if key in tensors}}
    return dataclasses.replace(weight, tensors=tensors)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 300])   # each tile height's number of chains of sums
@pytest.mark.parametrize("out_features,in_features,group_size",
                         [(16, 64, 32), (40, 160, 128), (97, 576, 32), (33, 256, 16)])
@pytest.mark.parametrize("variant", ["offset", "zero", "zero+g_idx", "zero+bf16", "offset+f32", "zero+f32"])
@pytest.mark.parametrize("bits", [4, 8])
def test_grouped_linear_equals_the_dequantized_weight_times_x(rows, out_features, in_features, group_size, variant,
                                                              bits, dtype):
    if not grouped_kernel_takes(dtype):
        pytest.skip(f"this CPU's grouped linear kernel does not take {dtype} (AVX512-BF16: bfloat16; AVX2: both)")
    torch.manual_seed(rows + out_features)
    weight = grouped_weight(variant, bits, out_features, in_features, group_size, dtype)
    bias = torch.randn(out_features, dtype=dtype)
    x = torch.randn(2, rows, in_features + 16, dtype=dtype)[..., :in_features]
    kernel = grouped_linear(weight)
    exact = x.double() @ dequantize(weight, torch.float64).T
    for b in (None, bias):
        expected = (exact if b is None else exact + b.double()).to(dtype)
        torch.testing.assert_close(kernel(x, b), expected, **TOLERANCE[dtype])


# Q4_K, Q5_K (offsets), Q3_K and Q6_K (zero points) by bits on the kernel: (levels, zero point)
K_QUANT_LEVELS = {("offset", 4): (16, None), ("offset", 8): (32, None), ("zero", 4): (8, 4), ("zero", 8): (64, 32)}


def k_quant_weight(form: str, bits: int) -> QuantizedWeight:
    """40 x 256 weights in groups of 16 as K-quants make them: levels of up to 6 bits, float32 scales d * sc of an
    11-bit d, and offsets -dmin * m with dmin as small as d (offset - 2^bits * scale takes up to 26 bits)."""
    levels, zero = K_QUANT_LEVELS[form, bits]
    scale = k_quant_like(torch.rand(40, 16) + 1)
    second = {"offset": -k_quant_like(scale)} if zero is None else {"zero": torch.full((40, 16), zero)}
    tensors = {"qweight": torch.randint(0, levels, (40, 256), dtype=torch.uint8), "scale": scale, **second}
    return QuantizedWeight(grouped.SCHEME_OF_BITS[bits], tensors, (40, 256), 16, torch.float32)


@pytest.mark.skipif(not grouped_kernel_takes(torch.float32),
                    reason="float32 inputs show the grouped kernel's weights unrounded; its AVX2 form takes them")
@pytest.mark.parametrize("variant", ["offset", "zero", "k-quant offset", "k-quant zero"])
@pytest.mark.parametrize("bits", [4, 8])
def test_grouped_kernel_weights_are_the_dequantized_weights_bit_for_bit(variant, bits):
    torch.manual_seed(bits)
    if variant.startswith("k-quant"):
        weight = k_quant_weight(variant.split()[1], bits)
    else:
        weight = grouped_weight(variant, bits, 40, 256, 16, torch.float32)
    one_hot_rows = torch.eye(256)   # row k times the weight: input k's weights, each a single product
    assert torch.equal(grouped_linear(weight)(one_hot_rows, None), dequantize(weight, torch.float32).T)


@pytest.mark.skipif(not grouped_kernel_takes(torch.bfloat16), reason="no grouped linear kernel on this CPU")
def test_grouped_scales_are_stored_in_float16_where_it_holds_them_else_in_float32():
    torch.manual_seed(0)
    weight = grouped_weight("offset", 4, 32, 64, 32, torch.bfloat16)
    levels, scale, offset = (weight.tensors[key] for key in ("qweight", "scale", "offset"))
    pack = native.load("grouped")[0].pack_linear_grouped
    for scales, offsets, stored in ((scale, offset, torch.float16), (k_quant_like(scale), offset, torch.float32),
                                    (scale, k_quant_like(offset), torch.float32)):
        assert pack(levels, scales, offsets, 32, 4)[1].dtype == stored


def fp8_weight(variant: str, out_features: int, in_features: int):
    weight = torch.randn(out_features, in_features) * 0.1
    if variant in ("w8a8-per-channel", "w8a16-per-channel"):
        quantized = fp8.quantize_weight(weight)
        scheme = fp8.SCHEME if variant.startswith("w8a8") else fp8.WEIGHT_ONLY
        return dataclasses.replace(quantized, scheme=scheme)
    block, blocks = 16, (-(-out_features // 16), -(-in_features // 16))   # a checkpoint's 16 x 16 blocks
    scale = torch.rand(blocks) * 0.01 + 1e-3
    levels = (weight / scale.repeat_interleave(16, 0)[:out_features].repeat_interleave(16, 1)[:, :in_features])
    input_scale = torch.tensor(0.02) if variant == "w8a8-static" else None
    return fp8.stored_weight(levels.clamp(-448, 448).to(torch.float8_e4m3fn), scale, block, input_scale,
                             fp8.WEIGHT_ONLY if variant == "w8a16-blocks" else fp8.SCHEME)


@pytest.mark.skipif(not native.supported("fp8"), reason="the FP8 linear kernel needs a CPU with AVX2")
@pytest.mark.parametrize("rows", [1, 2, 5, 300])
@pytest.mark.parametrize("out_features,in_features", [(16, 64), (40, 72), (97, 12)])   # partial blocks and groups
@pytest.mark.parametrize("variant", ["w8a8-per-channel", "w8a16-per-channel", "w8a8-blocks", "w8a16-blocks",
                                     "w8a8-static"])
def test_fp8_linear_equals_the_dequantized_weight_times_the_rounded_inputs(rows, out_features, in_features,
                                                                           variant, dtype):
    torch.manual_seed(rows + out_features)
    weight = dataclasses.replace(fp8_weight(variant, out_features, in_features), dtype=dtype)
    bias = torch.randn(out_features, dtype=dtype)
    x = torch.randn(2, rows, in_features + 8, dtype=dtype)[..., :in_features] * 4
    x[0, 0] = 0   # a row of zeros
    inputs = x.double() if weight.scheme == fp8.WEIGHT_ONLY else fp8.fake_quantize_inputs(weight, x).double()
    exact = inputs @ dequantize(weight, torch.float64).T
    kernel = fp8_linear(weight)
    for b in (None, bias):
        expected = (exact if b is None else exact + b.double()).to(dtype)
        torch.testing.assert_close(kernel(x, b), expected, **TOLERANCE[dtype])
    assert fp8_linear(fp8_weight(variant, 16, 62)) is None   # a width not a multiple of 4


def test_grouped_layers_the_kernel_cannot_take_keep_the_reference():
    bf16 = torch.bfloat16   # which every grouped kernel takes
    for in_features, group_size in ((72, 24), (72, 32)):   # a group or a width that is not a multiple of 16
        assert grouped_linear(int4.quantize_weight(torch.randn(32, in_features, dtype=bf16), group_size)) is None
    weight = int4.quantize_weight(torch.randn(32, 64, dtype=bf16))
    assert grouped_kernel_takes(bf16) == (grouped_linear(weight) is not None)
    assert grouped_linear(dataclasses.replace(weight, dtype=torch.float16)) is None
    uneven = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)   # act-order groups of 40 and 24 inputs
    assert grouped_linear(dataclasses.replace(weight, tensors={**weight.tensors, "g_idx": uneven})) is None
    for key in ("scale", "offset"):   # float32 rounds them
        tenths = torch.full_like(weight.tensors[key], 0.1, dtype=torch.float64)
        assert grouped_linear(dataclasses.replace(weight, tensors={**weight.tensors, key: tenths})) is None


@pytest.mark.skipif(not native.supported("bf16"), reason="the bfloat16 linear kernel needs a CPU with AVX512-BF16")
def test_bfloat16_models_fuse_gate_up_with_silu_and_mul(tiny_model):
    from kvserve import LLM
    from kvserve.core.layers.linear import GateUpLinear

    def gate_ups(dtype, quantization=None):
        llm = LLM(tiny_model("qwen2"), dtype=dtype, quantization=quantization, kv_cache_memory="16MiB")
        return [m for m in llm.llm_engine.runner.model.modules() if isinstance(m, GateUpLinear)]

    fused = gate_ups("bfloat16")
    assert len(fused) == 2 and all(m.activated and m.weight is None for m in fused)   # one a layer
    # float32 has no fused kernel and int8 layers keep their scheme's matmul: both run silu_and_mul after it.
    assert not any(m.activated for m in gate_ups("float32") + gate_ups("bfloat16", "int8"))
