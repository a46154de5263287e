"""Paged-attention parity cases that every backend runs: a batch of sequences with some tokens already cached
and some new, against a direct reference. They use only the backend contract (build_metadata, forward)."""
from __future__ import annotations

import dataclasses

import torch

from kvserve.plugins.interfaces import StepLayout

# (tokens already cached, new tokens) per sequence, decodes first: a decode, a whole prompt, a chunk after
# cached context; the second batch has whole prompts only; the fourth decodes alone; the last has prompts longer
# than the CPU kernel's 16-query tiles.
SHAPES = [[(9, 1), (0, 1), (0, 7), (5, 6)], [(20, 1), (0, 7), (0, 3)], [(0, 5), (0, 9)], [(3, 1), (30, 1)],
          [(40, 1), (0, 40), (20, 37)]]
NUM_HEADS, NUM_KV_HEADS = 6, 2


def reference_attention(q, k, v, scale, window, soft_cap=None):
    """One sequence: q [n, heads, d] are the last n of the k/v [ctx, kv_heads, d] positions."""
    n, ctx, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    q_pos = torch.arange(ctx - n, ctx)[:, None]
    k_pos = torch.arange(ctx)[None, :]
    allowed = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def as_fp8_cache_holds(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x, float32, as an FP8 cache gives it back: fp8(x / scale), saturated, times scale."""
    top = torch.finfo(cache_dtype).max
    return (x.float() / scale).clamp(-top, top).to(cache_dtype).float() * scale


# An FP8 cache's scales: keys' small enough that some of them saturate at e4m3's 448.
FP8_KV_SCALES = (0.006, 0.02)


def check_against_reference(backend, shapes, head_size: int, block_size: int, dtype: torch.dtype,
                            window: int | None, device: torch.device = torch.device("cpu"),
                            cache_dtype: torch.dtype | None = None) -> None:
    """Two steps, each compared with the reference: the first prefills each sequence's cached tokens, the second
    runs ``shapes`` over them, with the backend's spec's heads. With an FP8 ``cache_dtype``, the reference attends
    keys and values as that cache holds them. The reference caps scores as ``backend.spec.logits_soft_cap`` says.
    Each step's metadata comes from a backend of the same class without window or cap, as another layer's may
    build it."""
    torch.manual_seed(0)
    num_blocks, num_heads, num_kv_heads = 40, backend.spec.num_heads, backend.spec.num_kv_heads
    fp8 = {} if cache_dtype is None else {"kv_scales": FP8_KV_SCALES}
    cache = torch.zeros(backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size),
                        dtype=cache_dtype or dtype, device=device)
    free = torch.randperm(num_blocks).tolist()
    sequences = []
    for cached, new in shapes:
        total = cached + new
        k, v = (torch.randn(total, num_kv_heads, head_size, dtype=dtype, device=device) for _ in range(2))
        q = torch.randn(total, num_heads, head_size, dtype=dtype, device=device)
        table = [free.pop() for _ in range(-(-total // block_size))]
        sequences.append((cached, total, q, k, v, table))
    earlier = [(0, cached, *rest) for cached, _, *rest in sequences if cached]
    now = [(cached, *rest) for cached, *rest in sequences]
    for step, num_decodes in ((earlier, 0), (now, sum(1 for cached, new in shapes if new == 1 and cached))):
        if step:
            _check_step(backend, step, num_decodes, cache, dtype, window, cache_dtype, fp8)


def metadata_builder(backend):
    """A backend of ``backend``'s class for a layer without window or cap: the model's, in a model whose layers
    differ in them, which builds each step's metadata for all."""
    plain = dataclasses.replace(backend.spec, sliding_window=None, logits_soft_cap=None)
    return backend if plain == backend.spec else type(backend)(plain, backend.device)


def _check_step(backend, step, num_decodes, cache, dtype, window, cache_dtype, fp8) -> None:
    """One forward over ``step``'s sequences: (tokens in context before, after, their q, k, v, block table)."""
    queries, keys, values, expected = [], [], [], []
    for start, end, q, k, v, _ in step:
        queries.append(q[start:end]), keys.append(k[start:end]), values.append(v[start:end])
        k, v = k[:end], v[:end]
        if cache_dtype is not None:
            k, v = (as_fp8_cache_holds(x, cache_dtype, scale) for x, scale in zip((k, v), FP8_KV_SCALES))
        expected.append(reference_attention(q[start:end].float(), k.float(), v.float(), 0.3, window,
                                            backend.spec.logits_soft_cap).to(dtype))
    layout = StepLayout(query_lens=[end - start for start, end, *_ in step], seq_lens=[end for _, end, *_ in step],
                        block_tables=[table for *_, table in step], num_decodes=num_decodes)
    out = backend.forward(torch.cat(queries), torch.cat(keys), torch.cat(values), cache,
                          metadata_builder(backend).build_metadata(layout), 0.3, **fp8)
    # bfloat16: kernels round probabilities to bfloat16 before multiplying by values.
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, torch.cat(expected), rtol=tolerance, atol=tolerance)
