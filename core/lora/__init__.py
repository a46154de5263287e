"""LoRA adapters over the base model: reading PEFT folders, their place in host and device memory, and the
batched matmuls that add each token's adapter to the projections it targets (docs/lora.md)."""
from kvserve.core.lora.request import LoRARequest

__all__ = ["LoRARequest"]
