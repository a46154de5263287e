"""Hermes-style tool calls, as Qwen 2.5 / Qwen 3 and NousResearch Hermes write them:
``text <tool_call>{"name": "f", "arguments": {...}}</tool_call> <tool_call>...</tool_call>``."""
from __future__ import annotations

from typing import ClassVar

from kvserve.core.entrypoints.openai.tool_parsers.base import ToolCallStream, ToolParser
from kvserve.core.entrypoints.openai.tool_parsers.json_calls import JsonCallReader


class HermesToolParser(ToolParser):
    """Each call is a JSON object between ``start_tag`` and ``end_tag``; the text around the calls is content.

    A call cut off at the end of generation after its object closed, before or within its end tag, still counts.
    Subclass it with other tags for models that write the same JSON between tags of their own.
    """

    name: ClassVar[str] = "hermes"
    start_tag: ClassVar[str] = "<tool_call>"
    end_tag: ClassVar[str] = "</tool_call>"

    def stream(self) -> ToolCallStream:
        return TaggedJsonStream(self.start_tag, self.end_tag)


class TaggedJsonStream(ToolCallStream):
    """Content, then calls, each a JSON object between a start and an end tag."""

    def __init__(self, start_tag: str, end_tag: str):
        super().__init__()
        self.start_tag, self.end_tag = start_tag, end_tag
        self.mode = "content"
        self.reader: JsonCallReader | None = None

    def _advance(self, final: bool) -> None:
        while True:
            if self.mode == "content":
                if not self._content_until(self.start_tag, final):
                    return
                self._begin_region(self.start_tag)
                self.mode, self.reader = "call", JsonCallReader()
            elif self.mode == "call":
                state = self._read_call(self.reader)
                if state == "done":
                    self.mode = "end_tag"
                elif state == "failed" or final:
                    self._fail_region()
                    self.mode = "content"
                else:
                    return
            else:
                self._skip_space()
                found = self._expect(self.end_tag)
                if found is False:
                    self._fail_region()
                elif found is None and not final:
                    return
                else:
                    self._consume(len(self._pending) if final else 0)
                    self._close_region()
                self.mode = "content"
