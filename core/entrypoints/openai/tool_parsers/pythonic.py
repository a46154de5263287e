"""Pythonic tool calls, as Llama 3.2 / Llama 4 and ToolACE write them: ``[get_weather(city='Paris'), f(x=1)]``,
read with ``ast`` (literal arguments only) and sent as JSON."""
from __future__ import annotations

import ast
import json
import math
from typing import Any, ClassVar

from kvserve.core.entrypoints.openai.tool_parsers.base import ToolCallStream, ToolParser

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
JSON_NAMES = {"true": True, "false": False, "null": None}


class PythonicToolParser(ToolParser):
    """The response starts (after whitespace, optionally ``<|python_start|>``) with a Python list of calls with
    keyword arguments whose values are literals: strings, numbers, booleans, None, lists and dicts. Each call is
    sent when it closes, its arguments as ``json.dumps(..., ensure_ascii=False)``. Text after the list (and an
    optional ``<|python_end|>``) is content; a response that does not start with a valid list is all content.
    """

    name: ClassVar[str] = "pythonic"

    def stream(self) -> ToolCallStream:
        return PythonicStream()


class PythonicStream(ToolCallStream):
    def __init__(self) -> None:
        super().__init__()
        self.mode = "start"
        self.call: list[str] = []
        self.depth = 0
        self.quote = ""
        self.escaped = False
        self._begin_region()

    def _advance(self, final: bool) -> None:
        while self.mode != "content":
            if self.mode in ("start", "item", "separator"):
                self._skip_space()
            if not self._pending and not final:
                return
            if self.mode == "start":
                if self._pending.startswith("<"):
                    found = self._expect(PYTHON_START)
                    if found is None and not final:
                        return
                    if not found:
                        self._fail()
                    continue
                self._take_char("[", "item")
            elif self.mode == "item":
                if self._pending[:1].isidentifier():
                    self.mode, self.call, self.depth = "call", [], 0
                else:
                    self._fail()
            elif self.mode == "call":
                if not self._read_call_text(final):
                    return
            elif self.mode == "separator":
                if not self._take_char(",", "item"):
                    self._take_char("]", "list_end")
            else:
                found = self._expect(PYTHON_END)
                if found is None and not final:
                    return
                self._close_region()
                self.mode = "content"
        self._content(self._pending)
        self._pending = ""

    def _take_char(self, char: str, mode: str) -> bool:
        if not self._pending.startswith(char):
            if char != ",":
                self._fail()
            return False
        self._consume(1)
        self.mode = mode
        return True

    def _read_call_text(self, final: bool) -> bool:
        """Read up to the call's closing parenthesis, then send the call; False while more text is needed."""
        for count, char in enumerate(self._pending):
            if self.quote:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == self.quote:
                    self.quote = ""
            elif char in "'\"":
                self.quote = char
            elif char in "([{":
                self.depth += 1
            elif char in ")]}":
                self.depth -= 1
                if self.depth <= 0:
                    self.call.append(self._pending[:count + 1])
                    self._consume(count + 1)
                    self._send_call("".join(self.call))
                    return True
            elif self.depth == 0 and not (char.isidentifier() or char.isdigit() or char == "."):
                self._fail()
                return True
        self.call.append(self._pending)
        self._consume(len(self._pending))
        if final:
            self._fail()
        return final

    def _send_call(self, text: str) -> None:
        call = parse_call(text)
        if call is None:
            self._fail()
            return
        self._begin_call(call[0])
        self._arguments(call[1])
        self.mode = "separator"

    def _fail(self) -> None:
        self._fail_region()
        self.mode = "content"


def parse_call(text: str) -> tuple[str, str] | None:
    """(name, arguments as JSON) of ``name(key=literal, ...)``, or None where it is not such a call."""
    try:
        call = ast.parse(text, mode="eval").body
        if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
            return None
        arguments = {keyword.arg: literal(keyword.value) for keyword in call.keywords}
        return dotted_name(call.func), json.dumps(arguments, ensure_ascii=False)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


def dotted_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted_name(node.value)}.{node.attr}"
    raise ValueError("a call's function is a name")


def literal(node: ast.AST) -> Any:
    """The JSON value a literal stands for; ValueError for anything else (names, expressions, sets, bytes)."""
    if isinstance(node, ast.Constant) and (node.value is None or type(node.value) in (str, int, float, bool)):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise ValueError("JSON has no infinite numbers")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = literal(node.operand)
        if type(value) not in (int, float):
            raise ValueError("a sign applies to a number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [literal(element) for element in node.elts]
    if isinstance(node, ast.Dict):
        keys = [literal(key) if key is not None else None for key in node.keys]
        if not all(isinstance(key, str) for key in keys):
            raise ValueError("JSON object keys are strings")
        return dict(zip(keys, (literal(value) for value in node.values)))
    if isinstance(node, ast.Name) and node.id in JSON_NAMES:
        return JSON_NAMES[node.id]
    raise ValueError(f"not a literal: {type(node).__name__}")
