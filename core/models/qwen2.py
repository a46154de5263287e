"""Qwen2: the Llama decoder with biases on the q/k/v projections."""
from __future__ import annotations

from kvserve.core.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True

    def window_of(self, config, layer: int) -> int | None:
        if getattr(config, "use_sliding_window", False) and getattr(config, "layer_types", None) is None:
            raise ValueError(f"{config.model_type} checkpoints with use_sliding_window=True and no layer_types are "
                             f"not supported; allowed: use_sliding_window=False, or layer_types naming the "
                             f"sliding layers")
        return super().window_of(config, layer)
