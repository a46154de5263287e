"""Parity cases for a platform's fused ops (platform_ops) against the torch references they replace."""
from __future__ import annotations

import torch

from kvserve.core.layers import ops as reference

# float32 agrees to rounding; bfloat16 rounds where the references round, so results differ by at most one ulp.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
             torch.float16: dict(rtol=1e-3, atol=1e-3)}


def tolerance_of(dtype: torch.dtype, ulps: int = 1) -> dict:
    return {name: value * ulps for name, value in TOLERANCE[dtype].items()}


def check_rms_norm(ops: dict, dtype: torch.dtype, device: torch.device, ulps: int = 1) -> None:
    x = torch.randn(37, 96, dtype=dtype, device=device)
    weight = torch.randn(96, dtype=dtype, device=device)
    torch.testing.assert_close(ops["rms_norm"](x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5),
                               **tolerance_of(dtype, ulps))


def check_add_rms_norm(ops: dict, dtype: torch.dtype, device: torch.device, ulps: int = 1) -> None:
    x, residual = (torch.randn(37, 96, dtype=dtype, device=device) for _ in range(2))
    weight = torch.randn(96, dtype=dtype, device=device)
    for got, expected in zip(ops["add_rms_norm"](x, residual, weight, 1e-6),
                             reference.add_rms_norm(x, residual, weight, 1e-6)):
        torch.testing.assert_close(got, expected, **tolerance_of(dtype, ulps))


def check_silu_and_mul(ops: dict, dtype: torch.dtype, device: torch.device, ulps: int = 1) -> None:
    check_gated_activation(ops, "silu_and_mul", dtype, device, ulps)


def check_gelu_tanh_and_mul(ops: dict, dtype: torch.dtype, device: torch.device, ulps: int = 1) -> None:
    check_gated_activation(ops, "gelu_tanh_and_mul", dtype, device, ulps)


def check_gated_activation(ops: dict, name: str, dtype: torch.dtype, device: torch.device, ulps: int = 1) -> None:
    x = torch.randn(5, 7, 200, dtype=dtype, device=device) * 6   # large gates reach exp's clamped range
    torch.testing.assert_close(ops[name](x), getattr(reference, name)(x), **tolerance_of(dtype, ulps))


def check_rotary_on_strided_views(ops: dict, dtype: torch.dtype, device: torch.device, head_size: int,
                                  rotary_dim: int, ulps: int = 1) -> None:
    # q and k are views into one fused qkv projection, as the models hand them over.
    tokens = 11
    qkv = torch.randn(tokens, 6 * head_size, dtype=dtype, device=device)
    q = qkv[:, :4 * head_size].view(tokens, 4, head_size)
    k = qkv[:, 4 * head_size:5 * head_size].view(tokens, 1, head_size)
    angles = torch.rand(tokens, rotary_dim // 2, device=device) * 6
    got = ops["rotary_embedding"](q, k, angles.cos(), angles.sin())
    for g, e in zip(got, reference.rotary_embedding(q, k, angles.cos(), angles.sin())):
        torch.testing.assert_close(g, e, **tolerance_of(dtype, ulps))


def check_argmax(ops: dict, device: torch.device) -> None:
    # Rows wider than a vector and with a tail; ties, NaN (the largest, as torch.argmax) and all -inf rows.
    logits = torch.randn(7, 1000 + 13, device=device)
    logits[1, [5, 700]] = 1e9
    logits[2, [900, 40]] = float("nan")
    logits[3] = float("-inf")
    logits[4, -1] = 1e9
    assert torch.equal(ops["argmax"](logits), reference.argmax(logits))
    assert ops["argmax"](logits)[[1, 2, 3, 4]].tolist() == [5, 40, 0, 1012]


def check_fused_moe(ops: dict, dtype: torch.dtype, device: torch.device, ulps: int = 2) -> None:
    # Two of each token's experts, one of them sometimes another rank's (-1); the last expert gets no token.
    tokens, hidden, intermediate, experts = 9, 64, 96, 4
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    w13 = torch.randn(experts, 2 * intermediate, hidden, dtype=dtype, device=device) * 0.1
    w2 = torch.randn(experts, hidden, intermediate, dtype=dtype, device=device) * 0.1
    topk_weights = torch.rand(tokens, 2, device=device).softmax(-1)
    topk_ids = torch.randint(0, experts - 1, (tokens, 2), device=device)
    topk_ids[::3, 1] = -1
    torch.testing.assert_close(ops["fused_moe"](x, w13, w2, topk_weights, topk_ids),
                               reference.fused_moe(x, w13, w2, topk_weights, topk_ids), **tolerance_of(dtype, ulps))
