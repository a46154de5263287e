"""Rotary position embeddings, with the rope scaling types of transformers' ``ROPE_INIT_FUNCTIONS``.

transformers makes two types depend on the sequence: each forward call recomputes ``dynamic``'s base from the call's
longest position, and switches ``longrope`` to its long factors once that runs past
``original_max_position_embeddings``. Here a key outlives the step that computed it (the KV cache, prefix blocks
shared between requests, prompts prefilled in chunks), so a position's rotation depends on the position alone: one
table, with the base and factors of the longest sequence the model takes (``context_length``), as vLLM does when
max_model_len is left at the model's. That is transformers' own rotation wherever a transformers call reaches as far:
for longrope, any sequence longer than the original context; for dynamic, one forward over the whole
``context_length``. Shorter sequences get transformers' short-context rotation in transformers, the long one here.
"""
from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def rope_parameters(hf_config) -> dict:
    """The rope settings of a HF config, from ``rope_parameters`` (transformers 5) or ``rope_scaling``/``rope_theta``,
    with its ``max_position_embeddings``, which dynamic, yarn and longrope scaling read."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params["max_position_embeddings"] = int(hf_config.max_position_embeddings)
    params.setdefault("original_max_position_embeddings", params["max_position_embeddings"])
    factors = getattr(hf_config, "rope_freq_factors", None)   # from a GGUF file's rope_freqs tensor
    if factors is not None:
        params["freq_factors"] = factors
    return params


def max_positions(hf_config) -> int:
    """The longest sequence, prompt and output, that a checkpoint takes with its rope scaling."""
    return context_length(rope_parameters(hf_config))


def context_length(params: dict) -> int:
    """``max_position_embeddings``, stretched by linear and dynamic scaling's ``factor``, and to yarn's and
    longrope's ``factor`` x ``original_max_position_embeddings``. llama3 checkpoints give their stretched length as
    max_position_embeddings already (Llama 3.1: 131072, from 8192 by a factor of 8)."""
    length, rope_type = params["max_position_embeddings"], params["rope_type"]
    if rope_type in ("linear", "dynamic"):
        return max(length, int(length * params["factor"]))
    if rope_type in ("yarn", "longrope"):
        return max(length, int(_factor(params) * params["original_max_position_embeddings"]))
    return length


def inverse_frequencies(rotary_dim: int, params: dict) -> torch.Tensor:
    """Each pair of rotary dimensions' frequency, computed as transformers' ``ROPE_INIT_FUNCTIONS`` compute it (the
    same float32 operations), for a sequence of ``context_length`` positions."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    base = _dynamic_base(rotary_dim, params) if rope_type == "dynamic" else float(params["rope_theta"])
    base_powers = base ** exponents
    if rope_type == "yarn":
        inv_freq = _yarn_scaling(base_powers, rotary_dim, params)
    elif rope_type == "longrope":
        long = context_length(params) > params["original_max_position_embeddings"]
        factors = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu")
        inv_freq = 1.0 / (factors * base_powers)
    else:
        inv_freq = 1.0 / base_powers
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, params)
    if "freq_factors" in params:
        inv_freq = inv_freq / torch.tensor(params["freq_factors"], dtype=torch.float32, device="cpu")
    return inv_freq


def attention_scaling(params: dict) -> float:
    """What transformers multiplies cos and sin by: yarn's and longrope's ``attention_factor``, given or derived from
    ``factor``; 1 for the other types."""
    rope_type = params["rope_type"]
    if rope_type not in ("yarn", "longrope"):
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = _factor(params)
    if rope_type == "longrope":
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) /
                                                   math.log(params["original_max_position_embeddings"]))
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def _factor(params: dict) -> float:
    """yarn's and longrope's ``factor``; where it is left out, the ratio of the stretched context to the original."""
    if params.get("factor") is not None:
        return params["factor"]
    return params["max_position_embeddings"] / params["original_max_position_embeddings"]


def _dynamic_base(rotary_dim: int, params: dict) -> torch.Tensor:
    # In float32 tensors, as transformers computes it from the length it reads off position_ids.
    length, factor = torch.tensor(context_length(params), device="cpu"), params["factor"]
    stretch = factor * length / params["max_position_embeddings"] - (factor - 1)
    return params["rope_theta"] * stretch ** (rotary_dim / (rotary_dim - 2))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_scaling(base_powers: torch.Tensor, rotary_dim: int, params: dict) -> torch.Tensor:
    """Interpolate the low frequencies by ``factor``, keep the high ones, and ramp between the dimensions that turn
    ``beta_slow`` and ``beta_fast`` times over the original context."""
    base, original = float(params["rope_theta"]), params["original_max_position_embeddings"]

    def dimension_turning(turns: float) -> float:
        return rotary_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_turning(params.get("beta_fast") or 32), dimension_turning(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp
    return 1.0 / (_factor(params) * base_powers) * (1 - extrapolated) + 1.0 / base_powers * extrapolated


def _llama3_scaling(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor, old_len = params["factor"], params["original_max_position_embeddings"]
    low_factor, high_factor = params["low_freq_factor"], params["high_freq_factor"]
    low_freq_wavelen, high_freq_wavelen = old_len / low_factor, old_len / high_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """One instance serves every layer of a model: the model looks the angles of a step's positions up once
    (``angles``) and hands them to each layer's attention."""

    def __init__(self, rotary_dim: int, max_position: int, params: dict, ops):
        """``max_position``: the positions the table holds at least; it holds as many as the rope scaling of
        ``params`` stretches the context to."""
        super().__init__()
        self.ops = ops
        self.inv_freq = inverse_frequencies(rotary_dim, params)
        self.scaling = attention_scaling(params)
        self.max_position = max(max_position, context_length(params))
        self.cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each position's angles, [tokens, rotary_dim // 2], times the attention scaling."""
        # Built on first use, in float32 on the inputs' device: the model itself is built on the meta device.
        if self.cos_sin is None or self.cos_sin[0].device != positions.device:
            freqs = torch.outer(torch.arange(self.max_position, dtype=torch.float32, device="cpu"), self.inv_freq)
            cos, sin = freqs.cos() * self.scaling, freqs.sin() * self.scaling
            self.cos_sin = cos.to(positions.device), sin.to(positions.device)
        cos, sin = self.cos_sin
        return cos[positions], sin[positions]

    def forward(self, angles: tuple[torch.Tensor, torch.Tensor], query: torch.Tensor, key: torch.Tensor):
        return self.ops.rotary_embedding(query, key, *angles)
