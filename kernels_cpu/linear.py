"""Linear layers through oneDNN with weights prepacked once into its blocked layout."""
from __future__ import annotations

from typing import Callable

import torch

# The batch size oneDNN picks the packed layout for: a decode step of a busy server. Other sizes still run.
PACKING_BATCH_SIZE = 32


def packed_linear(weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """``x @ weight.T + bias`` on the packed weight; None for float16 (no native float16 matmul on most CPUs)
    or a torch built without oneDNN."""
    if weight.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKING_BATCH_SIZE)

    def linear(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    return linear
