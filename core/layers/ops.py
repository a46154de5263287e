"""Named ops with torch reference implementations; a platform may replace any of them (platform_ops)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Add ``residual`` to ``x`` and normalize; returns (normalized, new residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """GeGLU (Gemma): GELU's tanh approximation of the gate (transformers' gelu_pytorch_tanh) times up."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def rotary_embedding(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate [tokens, heads, head] query/key by per-token [tokens, rotary_dim / 2] cos/sin (rotate-half layout)."""
    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot_dim = cos.shape[-1] * 2
        x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        c = torch.cat([cos, cos], -1)[:, None, :]
        s = torch.cat([sin, sin], -1)[:, None, :]
        half = rot_dim // 2
        rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], -1)
        out = (x_rot.float() * c + rotated.float() * s).to(x.dtype)
        return torch.cat([out, x_pass], -1) if x_pass.numel() else out

    return rotate(query), rotate(key)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest value over the last dimension, the first on ties, NaN as the largest."""
    return x.argmax(dim=-1)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Each token of ``x`` [tokens, hidden] through its top-k experts: gate and up projections ``w13`` [experts,
    2 * intermediate, hidden], silu(gate) * up, down projection ``w2`` [experts, hidden, intermediate]; the outputs
    weighed by ``topk_weights`` [tokens, k] and summed. An id below 0 is another rank's expert: skipped. Here the
    (token, expert) pairs are sorted by expert and each expert with any runs one matmul over its tokens (their
    counts read on the host once); platforms may fuse it."""
    flat = topk_ids.flatten()
    skipped, *counts = torch.bincount(flat + 1, minlength=w13.shape[0] + 1).tolist()
    order = flat.argsort(stable=True)[skipped:]
    tokens = order // topk_ids.shape[1]
    rows, outputs, start = x[tokens], [], 0
    for expert, count in enumerate(counts):
        if count:
            hidden = silu_and_mul(F.linear(rows[start:start + count], w13[expert]))
            outputs.append(F.linear(hidden, w2[expert]))
            start += count
    if not outputs:
        return torch.zeros_like(x)
    weighed = torch.cat(outputs) * topk_weights.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, tokens, weighed.to(x.dtype))


REFERENCE_OPS: dict[str, Callable] = {
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "silu_and_mul": silu_and_mul,
    "gelu_tanh_and_mul": gelu_tanh_and_mul,
    "rotary_embedding": rotary_embedding,
    "argmax": argmax,
    "fused_moe": fused_moe,
}


class Ops:
    """The op table one model uses: the torch references, overridden by the platform's fused ops."""

    def __init__(self, overrides: dict[str, Callable] | None = None):
        unknown = set(overrides or {}) - set(REFERENCE_OPS)
        if unknown:
            raise ValueError(f"platform_ops returned unknown op names {sorted(unknown)}; "
                             f"allowed: {sorted(REFERENCE_OPS)}")
        table = {**REFERENCE_OPS, **(overrides or {})}
        for name, fn in table.items():
            setattr(self, name, fn)
