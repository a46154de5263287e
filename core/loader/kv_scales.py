"""KV cache scales that quantization tools write per attention layer: what an FP8 cache divides the layer's keys
and values by. A checkpoint without them gets 1.0 (vLLM's default), which suits keys and values well inside
e4m3's +-448."""
from __future__ import annotations

import torch
from torch import nn

from kvserve.core.layers.attention import Attention

# name suffix -> which of (keys, values) it scales
SUFFIXES = {"self_attn.k_scale": (0,), "self_attn.v_scale": (1,),   # compressed-tensors (llm-compressor, AutoRound)
            "self_attn.k_proj.output_scale": (0,), "self_attn.v_proj.output_scale": (1,),   # ModelOpt, Quark
            "self_attn.kv_scale": (0, 1)}   # AutoFP8: one scale for both


class KvScaleReader:
    """Takes a checkpoint's KV cache scales as they stream past, then hands each attention layer its pair."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.found: dict[str, list[float | None]] = {}

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether ``name`` is a KV cache scale (now read)."""
        for suffix, which in SUFFIXES.items():
            if name.endswith(f".{suffix}"):
                # Per-head scales give way to their largest, which keeps every head's values in range.
                scale = tensor.float().max().item()
                if not 0 < scale < float("inf"):
                    raise ValueError(f"checkpoint KV cache scale {name!r} is {scale}; it must be positive and finite")
                pair = self.found.setdefault(name.removesuffix(suffix) + "self_attn", [None, None])
                for i in which:
                    pair[i] = scale
                return True
        return False

    def finish(self) -> None:
        for block, (key_scale, value_scale) in self.found.items():
            if key_scale is None or value_scale is None:
                raise ValueError(f"checkpoint has a {'value' if key_scale is None else 'key'} cache scale for "
                                 f"{block!r} but no {'key' if key_scale is None else 'value'} scale")
            try:
                layers = [m for m in self.model.get_submodule(block).modules() if isinstance(m, Attention)]
            except AttributeError:
                layers = []
            if len(layers) != 1:
                raise ValueError(f"checkpoint KV cache scales for {block!r} have no attention layer in "
                                 f"{type(self.model).__name__}")
            layers[0].checkpoint_kv_scales = (key_scale, value_scale)
