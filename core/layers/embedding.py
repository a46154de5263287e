"""Learned absolute position embeddings (GPT-2's ``wpe``, OPT's ``embed_positions``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LearnedPositionEmbedding(nn.Embedding):
    """One learned vector per position, the whole table on every tensor-parallel rank (it is small). ``offset``:
    the rows before position 0's, which OPT's checkpoints keep (2)."""

    def __init__(self, num_positions: int, hidden_size: int, offset: int = 0):
        super().__init__(num_positions + offset, hidden_size)
        self.offset = offset

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.weight[self.offset:])
