"""The ``medusa`` method of speculative decoding: extra heads on the target's last hidden state, head i
proposing the token i + 2 positions ahead of it (the target's own head gives the next one), all in one pass.

A head is ``num_hidden_layers`` residual blocks (x + SiLU(W x + b)) and a projection to the vocabulary. Two
checkpoint layouts load: vLLM's (config ``num_heads`` and ``num_hidden_layers``; weights
``blocks.{i}.layers.{j}.weight|bias`` and ``lm_heads.{i}.weight``) and the Medusa project's (config
``medusa_num_heads`` and ``medusa_num_layers``; ``medusa_head.{i}.{j}.linear.weight|bias`` and
``medusa_head.{i}.{num_layers}.weight``, in ``medusa_lm_head.safetensors``).
"""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file

from kvserve.core.layers.ops import Ops

WEIGHT_FILES = ("model.safetensors", "medusa_lm_head.safetensors")


def _read_config(path: str) -> tuple[int, int, dict]:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"speculative_config model {path!r} is no Medusa heads folder: it has no config.json")
    with open(config_file) as f:
        config = json.load(f)
    heads = config.get("num_heads", config.get("medusa_num_heads"))
    layers = config.get("num_hidden_layers", config.get("medusa_num_layers"))
    if not isinstance(heads, int) or not isinstance(layers, int) or heads < 1 or layers < 0:
        raise ValueError(f"{config_file} needs num_heads (or medusa_num_heads) >= 1 and num_hidden_layers (or "
                         f"medusa_num_layers) >= 0, got {heads!r} and {layers!r}")
    return heads, layers, config


def _read_weights(path: str, num_heads: int, num_layers: int) -> dict[str, torch.Tensor]:
    """The weights under vLLM's names, whichever layout the folder holds."""
    files = [os.path.join(path, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    if not files:
        raise ValueError(f"Medusa heads folder {path!r} holds neither of {', '.join(WEIGHT_FILES)}")
    weights = {}
    for name, tensor in load_file(files[0]).items():
        block = re.fullmatch(r"medusa_head\.(\d+)\.(\d+)\.linear\.(weight|bias)", name)
        head = re.fullmatch(rf"medusa_head\.(\d+)\.{num_layers}\.weight", name)
        if block:
            name = f"blocks.{block[1]}.layers.{block[2]}.{block[3]}"
        elif head:
            name = f"lm_heads.{head[1]}.weight"
        weights[name] = tensor
    return weights


class MedusaHeads:
    """The first ``num_tokens`` heads of a checkpoint, for a target of ``hidden_size`` and ``vocab_size``."""

    def __init__(self, path: str, hidden_size: int, vocab_size: int, num_tokens: int, ops: Ops,
                 device: torch.device, dtype: torch.dtype):
        num_heads, num_layers, config = _read_config(path)
        if config.get("hidden_size", hidden_size) != hidden_size:
            raise ValueError(f"the Medusa heads in {path!r} take hidden_size={config['hidden_size']}; the target's "
                             f"is {hidden_size}")
        vocab = config.get("truncated_vocab_size") or config.get("vocab_size", vocab_size)
        if vocab != vocab_size:
            raise ValueError(f"the Medusa heads in {path!r} predict {vocab} tokens; the target's vocabulary has "
                             f"{vocab_size} (truncated vocabularies are not supported)")
        if num_tokens > num_heads:
            raise ValueError(f"num_speculative_tokens={num_tokens} exceeds the {num_heads} Medusa heads in {path!r}")
        weights = _read_weights(path, num_heads, num_layers)
        expected = {f"blocks.{i}.layers.{j}.{kind}" for i in range(num_heads) for j in range(num_layers)
                    for kind in ("weight", "bias")} | {f"lm_heads.{i}.weight" for i in range(num_heads)}
        if set(weights) != expected:
            missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise ValueError(f"the Medusa heads in {path!r} lack {missing[:4]} and hold unexpected {extra[:4]}")
        self.blocks = [[(weights[f"blocks.{i}.layers.{j}.weight"].to(device, dtype),
                         weights[f"blocks.{i}.layers.{j}.bias"].to(device, dtype)) for j in range(num_layers)]
                       for i in range(num_tokens)]
        self.heads = [weights[f"lm_heads.{i}.weight"].to(device, dtype) for i in range(num_tokens)]
        self.ops = ops

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token ids [rows, num_tokens]: each head's most likely token, from the target's last hidden states."""
        tokens = []
        for blocks, head in zip(self.blocks, self.heads):
            x = hidden
            for weight, bias in blocks:
                x = x + torch.nn.functional.silu(torch.nn.functional.linear(x, weight, bias))
            tokens.append(self.ops.argmax(torch.nn.functional.linear(x, head).float()))
        return torch.stack(tokens, dim=1)
