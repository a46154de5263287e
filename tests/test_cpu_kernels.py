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
def test_packed_linear_matches_torch(dtype, with_bias):
    from kvserve.kernels_cpu.linear import packed_linear

    weight, x = torch.randn(96, 64, dtype=dtype), torch.randn(3, 5, 64, dtype=dtype)
    bias = torch.randn(96, dtype=dtype) if with_bias else None
    kernel = packed_linear(weight)
    for rows in (x[0, :1], x):   # one row (a single decode) and a batch of any shape
        torch.testing.assert_close(kernel(rows, bias), torch.nn.functional.linear(rows, weight, bias),
                                   **TOLERANCE[dtype])
    assert packed_linear(weight.half()) is None   # float16 keeps torch's linear
