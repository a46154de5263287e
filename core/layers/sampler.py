"""Batched sampling: greedy, temperature, top-k, top-p and min-p, with per-request seeds.

Random rows draw by the exponential-race trick (argmax of p / E with E ~ Exp(1)), which samples
from p without a host sync; a seeded request draws its noise from its own generator so its
output does not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvserve.core.layers import ops


@dataclass
class SamplingBatch:
    temperatures: torch.Tensor          # [rows] float32; 0 means greedy
    top_k: torch.Tensor                 # [rows] int64; 0 means off
    top_p: torch.Tensor                 # [rows] float32; 1 means off
    min_p: torch.Tensor                 # [rows] float32; 0 means off
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    generators: dict[int, torch.Generator]   # row -> the request's own generator


def sample(logits: torch.Tensor, batch: SamplingBatch,
           argmax: Callable[[torch.Tensor], torch.Tensor] = ops.argmax) -> torch.Tensor:
    """Token ids [rows] from float32 logits [rows, vocab]; ``argmax`` is the platform's (ops.argmax)."""
    greedy_tokens = argmax(logits)
    if batch.all_greedy:
        return greedy_tokens
    sampled = argmax(probabilities(logits, batch) / exponential_noise(logits, batch.generators))
    return torch.where(batch.temperatures == 0, greedy_tokens, sampled)


def probabilities(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """What each row samples from: the softmax of its logits over its temperature, after top-k, top-p and
    min-p (greedy rows at temperature 1: their callers take the argmax instead)."""
    logits = logits / torch.where(batch.temperatures == 0, 1.0, batch.temperatures)[:, None]
    if batch.use_top_k or batch.use_top_p:
        logits = _top_k_top_p(logits, batch)
    if batch.use_min_p:
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits.softmax(dim=-1)


def exponential_noise(like: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Exp(1) draws shaped like ``like``; a row with a generator draws from it."""
    noise = torch.empty_like(like).exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    return noise


def _top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    if batch.use_top_k:
        k = torch.where(batch.top_k > 0, batch.top_k, vocab).clamp(max=vocab)
        beyond_k = torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
        sorted_logits = sorted_logits.masked_fill(beyond_k, float("-inf"))
    if batch.use_top_p:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before > batch.top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
