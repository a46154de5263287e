"""Rotary position embeddings, with the rope scaling types of Llama-family checkpoints."""
from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf_config) -> dict:
    """The rope settings of a HF config, from ``rope_parameters`` (transformers 5) or ``rope_scaling``/``rope_theta``."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    factors = getattr(hf_config, "rope_freq_factors", None)   # from a GGUF file's rope_freqs tensor
    if factors is not None:
        params["freq_factors"] = factors
    return params


def inverse_frequencies(rotary_dim: int, params: dict) -> torch.Tensor:
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim))
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, params)
    if "freq_factors" in params:
        inv_freq = inv_freq / torch.tensor(params["freq_factors"], dtype=torch.float32)
    return inv_freq


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
        super().__init__()
        self.ops = ops
        self.inv_freq = inverse_frequencies(rotary_dim, params)
        self.max_position = max_position
        self.cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each position's angles, [tokens, rotary_dim // 2]."""
        # Built on first use, in float32 on the inputs' device: the model itself is built on the meta device.
        if self.cos_sin is None or self.cos_sin[0].device != positions.device:
            freqs = torch.outer(torch.arange(self.max_position, dtype=torch.float32, device="cpu"), self.inv_freq)
            self.cos_sin = freqs.cos().to(positions.device), freqs.sin().to(positions.device)
        cos, sin = self.cos_sin
        return cos[positions], sin[positions]

    def forward(self, angles: tuple[torch.Tensor, torch.Tensor], query: torch.Tensor, key: torch.Tensor):
        return self.ops.rotary_embedding(query, key, *angles)
