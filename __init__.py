"""kvserve: a hardware-agnostic LLM inference and serving engine."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "StructuredOutputsParams", "PoolingParams", "LoRARequest",
           "__version__"]


def __getattr__(name: str):
    # Imported lazily so that `kvserve plugins` and plugin discovery do not load the engine.
    if name == "LLM":
        from kvserve.core.entrypoints.llm import LLM
        return LLM
    if name in ("SamplingParams", "BeamSearchParams"):
        from kvserve.core import sampling_params
        return getattr(sampling_params, name)
    if name == "PoolingParams":
        from kvserve.core.pooling_params import PoolingParams
        return PoolingParams
    if name == "LoRARequest":
        from kvserve.core.lora.request import LoRARequest
        return LoRARequest
    if name == "StructuredOutputsParams":
        from kvserve.core.structured_outputs import StructuredOutputsParams
        return StructuredOutputsParams
    raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
