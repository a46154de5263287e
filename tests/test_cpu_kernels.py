"""The CPU platform's compiled fused ops agree with the torch references they replace."""
from __future__ import annotations

import pytest
import torch

from kvserve.core.layers import ops as reference
from kvserve.kernels_cpu import native

pytestmark = pytest.mark.skipif(native.load()[0] is None, reason=f"native kernels unavailable: {native.load()[1]}")
# float32 agrees to rounding; bfloat16 rounds where the references round, so results differ by at most one ulp.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def dtype(request):
    torch.manual_seed(0)
    return request.param


def test_rms_norm(dtype):
    x, residual, weight = torch.randn(37, 96, dtype=dtype), torch.randn(37, 96, dtype=dtype), torch.randn(96, dtype=dtype)
    torch.testing.assert_close(native.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), **TOLERANCE[dtype])
    for got, expected in zip(native.add_rms_norm(x, residual, weight, 1e-6),
                             reference.add_rms_norm(x, residual, weight, 1e-6)):
        torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


def test_silu_and_mul(dtype):
    x = torch.randn(5, 7, 200, dtype=dtype) * 6   # large gates reach exp's clamped range
    torch.testing.assert_close(native.silu_and_mul(x), reference.silu_and_mul(x), **TOLERANCE[dtype])


@pytest.mark.parametrize("head_size, rotary_dim", [(64, 64), (24, 16)])
def test_rotary_embedding_on_strided_views(dtype, head_size, rotary_dim):
    # q and k are views into one fused qkv projection, as the models hand them over.
    tokens = 11
    qkv = torch.randn(tokens, 6 * head_size, dtype=dtype)
    q, k = qkv[:, :4 * head_size].view(tokens, 4, head_size), qkv[:, 4 * head_size:5 * head_size].view(tokens, 1, head_size)
    angles = torch.rand(tokens, rotary_dim // 2) * 6
    got = native.rotary_embedding(q, k, angles.cos(), angles.sin())
    for g, e in zip(got, reference.rotary_embedding(q, k, angles.cos(), angles.sin())):
        torch.testing.assert_close(g, e, **TOLERANCE[dtype])


def test_platform_uses_fused_ops():
    from kvserve.plugins.manager import PluginManager

    assert PluginManager().select_platform("cpu").ops() == native.FUSED_OPS


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("in_features", [64, 63])   # an odd width takes oneDNN's kernel in bfloat16 too
def test_packed_linear_matches_torch(dtype, with_bias, in_features):
    from kvserve.kernels_cpu.linear import packed_linear

    weight, x = torch.randn(96, in_features, dtype=dtype), torch.randn(3, 5, in_features, dtype=dtype)
    bias = torch.randn(96, dtype=dtype) if with_bias else None
    kernel = packed_linear(weight)
    for rows in (x[0, :1], x):   # one row (a single decode) and a batch of any shape
        torch.testing.assert_close(kernel(rows, bias), torch.nn.functional.linear(rows, weight, bias),
                                   **TOLERANCE[dtype])
    assert packed_linear(weight.half()) is None   # float16 keeps torch's linear


@pytest.mark.skipif(native.load()[0] is None or not native.load()[0].linear_bf16_supported(),
                    reason="the bfloat16 linear kernel needs a CPU with AVX512-BF16")
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 300])   # tiles of 8 rows, and more than one 256-row group
@pytest.mark.parametrize("out_features", [16, 40, 97])   # whole and partial blocks of 16 outputs
def test_linear_bf16_tiles_and_tails(rows, out_features):
    ops = native.load()[0]
    torch.manual_seed(rows * out_features)
    weight, bias = torch.randn(out_features, 72, dtype=torch.bfloat16), torch.randn(out_features, dtype=torch.bfloat16)
    x = torch.randn(2, rows, 100, dtype=torch.bfloat16)[..., :72]   # rows further apart than their width
    packed = ops.pack_linear_bf16(weight)
    expected = x.float() @ weight.float().T
    torch.testing.assert_close(ops.linear_bf16(x, packed, None, out_features), expected.bfloat16(),
                               **TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(ops.linear_bf16(x, packed, bias, out_features), (expected + bias.float()).bfloat16(),
                               **TOLERANCE[torch.bfloat16])
