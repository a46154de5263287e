"""Per-request parameters of a pooling (embedding) model, named as vLLM names them."""
from __future__ import annotations

from dataclasses import dataclass

from kvserve.core.options import check_int


@dataclass
class PoolingParams:
    """How to turn a prompt's pooled hidden state into its embedding.

    ``dimensions`` keeps the first that many values (matryoshka truncation, before normalization), for models whose
    config says they were trained for it; ``normalize`` overrides the model's own choice (its sentence-transformers
    Normalize module, or True without those files).
    """

    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self):
        check_int("dimensions", self.dimensions, 1, allow_none=True)
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True, False or None (the model's choice), got {self.normalize!r}")
