"""kvserve: a hardware-agnostic LLM inference and serving engine."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Imported lazily so that `kvserve plugins` and plugin discovery do not load the engine.
    if name == "LLM":
        from kvserve.core.entrypoints.llm import LLM
        return LLM
    if name == "SamplingParams":
        from kvserve.core.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
