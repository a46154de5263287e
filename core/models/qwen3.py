"""Qwen3: Qwen2's decoder whose attention RMS-normalizes each query and key head (``q_norm``, ``k_norm``) before
rotary, with the head size the config gives (``head_dim``), and biases on q/k/v only where ``attention_bias``."""
from __future__ import annotations

from kvserve.core.models.qwen2 import Qwen2ForCausalLM


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    qkv_bias = False
    qk_norm = True
