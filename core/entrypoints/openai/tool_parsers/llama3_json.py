"""Llama 3.1 / 3.2 JSON tool calls: ``{"name": "f", "parameters": {...}}``, several separated by ``;``, at the start
of the response or after ``<|python_tag|>``."""
from __future__ import annotations

from typing import ClassVar

from kvserve.core.entrypoints.openai.tool_parsers.base import ToolCallStream, ToolParser
from kvserve.core.entrypoints.openai.tool_parsers.json_calls import JsonCallReader

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """Calls are JSON objects with a "name" and "parameters" (or "arguments"), one or more separated by ``;``.

    They count only at the start of the response (after whitespace) or right after ``<|python_tag|>``; a JSON
    object anywhere else, or one without parameters, is content. Text after the last call is content. The server
    keeps special tokens in the text for ``<|python_tag|>`` to be seen.
    """

    name: ClassVar[str] = "llama3_json"
    skip_special_tokens: ClassVar[bool] = False

    def stream(self) -> ToolCallStream:
        return Llama3JsonStream()


class Llama3JsonStream(ToolCallStream):
    def __init__(self) -> None:
        super().__init__()
        self.mode = "start"
        self.reader: JsonCallReader | None = None
        self._begin_region()

    def _advance(self, final: bool) -> None:
        while True:
            if self.mode == "content":
                if not self._content_until(PYTHON_TAG, final):
                    return
                self._begin_region(PYTHON_TAG)
                self.mode = "call_start"
            elif self.mode in ("start", "call_start", "next_call"):
                self._skip_space()
                if self.mode == "start" and self._pending.startswith(PYTHON_TAG[0]):
                    found = self._expect(PYTHON_TAG)
                    if found is None and not final:
                        return
                    self.mode = "call_start" if found else "failed"
                elif self._pending.startswith("{"):
                    self.mode, self.reader = "call", JsonCallReader(arguments_required=True)
                elif not self._pending and not final:
                    return
                elif not self._pending and self.mode == "next_call":   # a trailing ";"
                    self._close_region()
                    self.mode = "content"
                else:
                    self.mode = "failed"
            elif self.mode == "call":
                state = self._read_call(self.reader)
                if state == "done":
                    self.mode = "separator"
                elif state == "failed" or final:
                    self.mode = "failed"
                else:
                    return
            elif self.mode == "separator":
                self._skip_space()
                if self._pending.startswith(";"):
                    self._consume(1)
                    self.mode = "next_call"
                elif self._pending or final:
                    self._close_region()
                    self.mode = "content"
                else:
                    return
            else:
                self._fail_region()
                self.mode = "content"
