"""Tool call parsers by the name ``--tool-call-parser`` takes: kvserve's own and those plugins register."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvserve.core.entrypoints.openai.tool_parsers.base import (ExtractedToolCalls, FunctionCall, StreamDelta,
                                                               ToolCallDelta, ToolCallStream, ToolParser)
from kvserve.core.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from kvserve.core.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from kvserve.core.entrypoints.openai.tool_parsers.mistral import MistralToolParser
from kvserve.core.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser

if TYPE_CHECKING:
    from kvserve.plugins.manager import PluginManager

__all__ = ["BUILTIN_TOOL_PARSERS", "ExtractedToolCalls", "FunctionCall", "ParserRegistry", "StreamDelta",
           "ToolCallDelta", "ToolCallStream", "ToolParser", "get_tool_parser", "tool_parser_names"]

BUILTIN_TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)}


class ParserRegistry:
    """Parsers of one kind by name: kvserve's ``builtin`` classes and those general plugins register through the
    PluginManager method ``registered`` (which must subclass ``base`` and take no built-in name)."""

    def __init__(self, what: str, base: type, builtin: dict[str, type], registered: str):
        self.what, self.base, self.builtin, self.registered = what, base, builtin, registered

    def get(self, name: str, plugins: PluginManager | None = None) -> type:
        """The class called ``name``; ``plugins`` (default: a new PluginManager) adds those of plugins."""
        parsers = self.all(plugins)
        if name not in parsers:
            raise ValueError(f"unknown {self.what} {name!r}; available: {', '.join(sorted(parsers))}")
        return parsers[name]

    def names(self, plugins: PluginManager | None = None) -> list[str]:
        """Every name, built-in and from plugins, sorted."""
        return sorted(self.all(plugins))

    def all(self, plugins: PluginManager | None) -> dict[str, type]:
        if plugins is None:
            from kvserve.plugins.manager import PluginManager
            plugins = PluginManager()
        added = getattr(plugins, self.registered)()
        for name, cls in added.items():
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"a plugin registers {self.what} {name!r} as {cls!r}, which is not a subclass of "
                                f"{_qualified(self.base)}")
            if name in self.builtin:
                raise ValueError(f"a plugin registers {self.what} {name!r} ({_qualified(cls)}) under the name of "
                                 f"kvserve's built-in {_qualified(self.builtin[name])}; register it under another name")
        return {**self.builtin, **added}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


TOOL_PARSERS = ParserRegistry("tool call parser", ToolParser, BUILTIN_TOOL_PARSERS, "tool_parsers")
get_tool_parser, tool_parser_names = TOOL_PARSERS.get, TOOL_PARSERS.names
