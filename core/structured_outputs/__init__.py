"""Structured outputs: constraints on what a request may generate (JSON schemas, regexes, choices, grammars)."""
from kvserve.core.structured_outputs.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
