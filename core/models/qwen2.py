"""Qwen2: the Llama decoder with biases on the q/k/v projections."""
from __future__ import annotations

from kvserve.core.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True

    @staticmethod
    def window_of(config) -> int | None:
        if getattr(config, "use_sliding_window", False):
            raise ValueError(f"{config.model_type} checkpoints with use_sliding_window=True are not supported yet")
        return None
