"""Activation functions by the names Hugging Face configs give them (``activation_function``, ``hidden_act``)."""
from __future__ import annotations

from torch import nn


def activation(name: str, field: str) -> nn.Module:
    """transformers' activation ``name`` (its ``ACT2FN`` table: gelu_new, relu, ...), computed as transformers
    computes it; a ValueError naming the config ``field`` where there is none of that name."""
    from transformers.activations import ACT2FN   # here: importing it takes 1.5 s, which starting Llama need not

    if name not in ACT2FN:
        raise ValueError(f"{field}={name!r} is not supported; allowed: {', '.join(sorted(ACT2FN))}")
    return ACT2FN[name]
