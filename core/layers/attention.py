"""The attention layer: projects nothing itself, only hands q/k/v to the platform's backend."""
from __future__ import annotations

import torch
from torch import nn

from kvserve.plugins.interfaces import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None):
        """``sliding_window`` and ``logits_soft_cap``: this layer's, as AttentionSpec describes them; layers of
        one model may differ in them."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.backend: AttentionBackend | None = None   # bound by the model runner with the KV cache
        self.kv_cache: torch.Tensor | None = None
        self.checkpoint_kv_scales: tuple[float, float] | None = None   # (keys', values'), if the checkpoint has them
        self.kv_scales: tuple[float, float] | None = None   # those an FP8 cache uses; None for other caches
        # With calculate_kv_scales, until the first forward: the level that the first batch's largest key (and
        # value) becomes, which sets its scale.
        self.first_batch_level: float | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        if self.first_batch_level is not None:
            largest = torch.stack([k.abs().amax(), v.abs().amax()]).float().tolist()   # once: a host sync
            self.kv_scales = tuple(x / self.first_batch_level if x > 0 else 1.0 for x in largest)
            self.first_batch_level = None
        fp8 = {} if self.kv_scales is None else {"kv_scales": self.kv_scales}
        out = self.backend.forward(q.view(-1, self.num_heads, self.head_size),
                                   k.view(-1, self.num_kv_heads, self.head_size),
                                   v.view(-1, self.num_kv_heads, self.head_size),
                                   self.kv_cache, metadata, self.scale, **fp8)
        return out.reshape(-1, self.num_heads * self.head_size)
