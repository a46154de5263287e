"""Mistral tool calls after ``[TOOL_CALLS]``: a JSON list ``[{"name": "f", "arguments": {...}}, ...]`` (tokenizers
before v11: Mistral 7B v0.3, Mixtral), or ``f[ARGS]{...}`` (v11 and later: Mistral Small 3.x, Devstral)."""
from __future__ import annotations

import re
from typing import ClassVar

from kvserve.core.entrypoints.openai.tool_parsers.base import ToolCallStream, ToolParser
from kvserve.core.entrypoints.openai.tool_parsers.json_calls import JsonCallReader

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
NAME = re.compile(r"[A-Za-z0-9_.\-]*")
NEEDS_TEXT = ("after_marker", "list_item", "list_separator", "name")


class MistralToolParser(ToolParser):
    """Each ``[TOOL_CALLS]`` starts a list of JSON calls (or one JSON call), or one call written as its name,
    ``[ARGS]`` (which a tokenizer that skips special tokens leaves out) and its arguments object. Text before and
    after is content. The server keeps special tokens in the text for ``[TOOL_CALLS]`` to be seen.
    """

    name: ClassVar[str] = "mistral"
    skip_special_tokens: ClassVar[bool] = False

    def stream(self) -> ToolCallStream:
        return MistralStream()


class MistralStream(ToolCallStream):
    def __init__(self) -> None:
        super().__init__()
        self.mode = "content"
        self.reader: JsonCallReader | None = None
        self.name = ""

    def _advance(self, final: bool) -> None:
        while True:
            if self.mode == "content":
                if not self._content_until(TOOL_CALLS, final):
                    return
                self._begin_region(TOOL_CALLS)
                self.mode = "after_marker"
            if self.mode in ("after_marker", "list_item", "list_separator"):
                self._skip_space()
            if not self._pending and not final and self.mode in NEEDS_TEXT:
                return
            if getattr(self, f"_mode_{self.mode}")(final) is False:
                return

    def _mode_after_marker(self, final: bool) -> None:
        if self._pending.startswith("["):
            self._consume(1)
            self.mode = "list_item"
        elif self._pending.startswith("{"):
            self.mode, self.reader = "single_call", JsonCallReader()
        else:
            self.name, self.mode = "", "name"

    def _mode_list_item(self, final: bool) -> None:
        if self._pending.startswith("{"):
            self.mode, self.reader = "list_call", JsonCallReader()
        else:
            self._fail()

    def _mode_list_separator(self, final: bool) -> None:
        if self._pending.startswith(","):
            self._consume(1)
            self.mode = "list_item"
        elif self._pending.startswith("]"):
            self._consume(1)
            self._mode_region_end(final)
        else:
            self._fail()

    def _mode_name(self, final: bool) -> bool | None:
        part = NAME.match(self._pending).group()
        self.name += part
        self._consume(len(part))
        if self._pending.startswith("["):
            found = self._expect(ARGS)
            if found is None and not final:
                return False
            if not found:
                self._fail()
                return None
        if self._pending.startswith("{") and self.name:
            self.mode, self.reader = "single_call", JsonCallReader(name=self.name)
        elif self._pending or final:
            self._fail()
        else:
            return False
        return None

    def _mode_list_call(self, final: bool) -> bool | None:
        return self._read(final, "list_separator")

    def _mode_single_call(self, final: bool) -> bool | None:
        return self._read(final, "region_end")

    def _mode_region_end(self, final: bool) -> None:
        self._close_region()
        self.mode = "content"

    def _read(self, final: bool, next_mode: str) -> bool | None:
        state = self._read_call(self.reader)
        if state == "done":
            self.mode = next_mode
        elif state == "failed" or final:
            self._fail()
        else:
            return False
        return None

    def _fail(self) -> None:
        self._fail_region()
        self.mode = "content"
