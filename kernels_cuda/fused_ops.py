"""Per-token ops that torch runs as several passes over memory, each one Triton kernel: RMSNorm (after a
residual add), SiLU-and-mul, rotary embedding. Arithmetic is float32; results are rounded to the input dtype
where the torch references in kvserve.core.layers.ops round."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(out, summed, x, residual, weight, stride_x, stride_r, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    dtype = out.dtype.element_ty
    v = tl.load(x + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        v = (v + tl.load(residual + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)).to(dtype)
        tl.store(summed + row * hidden + cols, v, mask=ok)
        v = v.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, 0) / hidden + eps)
    normed = (v * inv).to(dtype).to(tl.float32)
    w = tl.load(weight + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + row * hidden + cols, (w * normed).to(dtype), mask=ok)


@triton.jit
def _silu_and_mul_kernel(out, x, stride_x, width, BLOCK: tl.constexpr):
    row, part = tl.program_id(0), tl.program_id(1)
    cols = part * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    dtype = out.dtype.element_ty
    gate = tl.load(x + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x + row * stride_x + width + cols, mask=ok, other=0.0).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    tl.store(out + row * width + cols, (silu * up).to(dtype), mask=ok)


@triton.jit
def _rotary_kernel(out, x, cos, sin, stride_t, stride_h, num_heads, head, half,
                   HEADS_P: tl.constexpr, HALF_P: tl.constexpr, HEAD_P: tl.constexpr):
    token = tl.program_id(0)   # all of a token's heads at once
    h = tl.arange(0, HEADS_P)[:, None]
    src = x + token * stride_t + h * stride_h
    dst = out + (token * num_heads + h) * head
    d = tl.arange(0, HALF_P)[None, :]
    ok = (h < num_heads) & (d < half)
    c = tl.load(cos + token * half + d, mask=d < half, other=0.0)
    s = tl.load(sin + token * half + d, mask=d < half, other=0.0)
    first = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)
    second = tl.load(src + half + d, mask=ok, other=0.0).to(tl.float32)
    dtype = out.dtype.element_ty
    tl.store(dst + d, (first * c - second * s).to(dtype), mask=ok)
    tl.store(dst + half + d, (second * c + first * s).to(dtype), mask=ok)
    rest = 2 * half + tl.arange(0, HEAD_P)[None, :]   # dimensions past the rotary ones pass through
    passing = (h < num_heads) & (rest < head)
    tl.store(dst + rest, tl.load(src + rest, mask=passing), mask=passing)


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden).contiguous()
    res = residual.reshape(-1, hidden).contiguous() if residual is not None else rows
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else out
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](out, summed, rows, res, weight, rows.stride(0), res.stride(0), hidden,
                                           eps, HAS_RESIDUAL=residual is not None,
                                           BLOCK=triton.next_power_of_2(hidden))
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    width = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * width).contiguous()
    out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = min(1024, triton.next_power_of_2(width))
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(width, block))](out, rows, rows.stride(0), width,
                                                                          BLOCK=block)
    return out


def rotary_embedding(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate [tokens, heads, head] query/key (views with a contiguous head) by per-token
    [tokens, rotary_dim / 2] cos/sin, rotate-half layout."""
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    half = cos.shape[-1]
    rotated = []
    for x in (query, key):
        x = x if x.stride(-1) == 1 else x.contiguous()
        tokens, heads, head = x.shape
        out = torch.empty((tokens, heads, head), dtype=x.dtype, device=x.device)
        if tokens:
            _rotary_kernel[(tokens,)](out, x, cos, sin, x.stride(0), x.stride(1), heads, head, half,
                                      HEADS_P=triton.next_power_of_2(heads), HALF_P=triton.next_power_of_2(half),
                                      HEAD_P=triton.next_power_of_2(head))
        rotated.append(out)
    return rotated[0], rotated[1]


FUSED_OPS = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "silu_and_mul": silu_and_mul,
             "rotary_embedding": rotary_embedding}
