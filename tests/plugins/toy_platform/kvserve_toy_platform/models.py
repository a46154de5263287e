"""A general kvserve plugin (entry-point group kvserve.plugins): a model architecture kvserve does not know.

``ToyLlamaForCausalLM`` is kvserve's Llama under another name, so a checkpoint whose config.json names it
runs only when this plugin is installed, and gives the plain Llama's tokens.
"""
from __future__ import annotations

from kvserve.core.models.llama import LlamaForCausalLM
from kvserve.plugins import hookimpl

KVSERVE_CONTRACT_VERSION = 1   # built before platform_bind_device; a general plugin uses none of what 2 added


class ToyLlamaForCausalLM(LlamaForCausalLM):
    """kvserve's Llama, registered under an architecture name of its own."""


@hookimpl
def register_models() -> dict:
    return {"ToyLlamaForCausalLM": ToyLlamaForCausalLM}
