"""A general kvserve plugin (entry-point group kvserve.plugins): a tool call parser and a reasoning parser for
formats kvserve does not know, ``<function_call>{...}</function_call>`` and ``[THINK]...[/THINK]``."""
from __future__ import annotations

from kvserve.core.entrypoints.openai.reasoning_parsers import ReasoningParser
from kvserve.core.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from kvserve.plugins import hookimpl

KVSERVE_CONTRACT_VERSION = 3


class FunctionTagToolParser(HermesToolParser):
    """Hermes-style JSON calls between tags of their own."""

    name = "function_tag"
    start_tag = "<function_call>"
    end_tag = "</function_call>"


class BracketThinkReasoningParser(ReasoningParser):
    """Reasoning between ``[THINK]`` and ``[/THINK]`` at the start of the response."""

    name = "bracket_think"
    start_tag = "[THINK]"
    end_tag = "[/THINK]"


@hookimpl
def register_tool_parsers() -> dict:
    return {FunctionTagToolParser.name: FunctionTagToolParser}


@hookimpl
def register_reasoning_parsers() -> dict:
    return {BracketThinkReasoningParser.name: BracketThinkReasoningParser}
