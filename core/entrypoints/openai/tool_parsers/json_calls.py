"""Reading a JSON tool call, ``{"name": ..., "arguments": {...}}``, a character at a time.

The arguments are the object's text exactly as the model wrote it, sent as it arrives once the name is known;
``json.loads`` checks the whole call when it closes.
"""
from __future__ import annotations

import json

ARGUMENT_KEYS = ("arguments", "parameters")
# Keys a call object may start with; any other first key means the JSON is not a call, decided without waiting
# for its end.
FIRST_KEYS = ("name", *ARGUMENT_KEYS, "type")
SCALAR_END = frozenset(",}] \t\r\n")
WHITESPACE = frozenset(" \t\r\n")


class JsonValueScanner:
    """Finds where one JSON value ends, from its strings and nesting (its syntax is checked when it is parsed)."""

    __slots__ = ("kind", "depth", "in_string", "escaped", "done")

    def __init__(self) -> None:
        self.kind = ""
        self.depth = 0
        self.in_string = self.escaped = self.done = False

    def take(self, char: str) -> bool:
        """Take the value's next character; False when ``char`` is not part of it (a number or literal ended)."""
        if not self.kind:
            self.kind = "string" if char == '"' else "container" if char in "{[" else "scalar"
            self.in_string, self.depth = char == '"', int(char in "{[")
            return True
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
                self.done = self.kind == "string"
            return True
        if self.kind == "scalar":
            self.done = char in SCALAR_END
            return not self.done
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            self.done = self.depth == 0
        return True


class JsonCallReader:
    """Reads one call object; ``state`` ends as "done" (a valid call, all of it sent through ``take``) or
    "failed" (not a call).

    Without ``name``, it reads ``{"name": "f", "arguments": {...}}`` ("parameters" too; other keys, such as "id",
    are ignored, but the first key must be one of ``FIRST_KEYS``; no arguments means ``{}`` unless
    ``arguments_required``). With ``name``, it reads only the arguments object of
    that call, as in Mistral's ``[TOOL_CALLS]f[ARGS]{...}``.
    """

    def __init__(self, arguments_required: bool = False, name: str | None = None):
        self.arguments_required = arguments_required
        self.bare = name is not None
        self.name = name
        self.state = "value_start" if self.bare else "open"
        self.key: str | None = "arguments" if self.bare else None
        self.keys: list[str] = []
        self.raw: list[str] = []
        self.value: JsonValueScanner | None = None
        self.value_raw: list[str] = []
        self.arguments_key: str | None = self.key
        self.arguments_raw = ""
        self.streaming = False
        self.sent_name: str | None = None
        self.sent_arguments: list[str] = []

    def read(self, text: str) -> int:
        """Read from ``text`` until the call ends or fails; returns how many characters belong to it."""
        for count, char in enumerate(text):
            self._char(char)
            if self.state == "failed":
                return count
            if self.state == "done":
                return count + 1
        return len(text)

    def take(self) -> tuple[str | None, str]:
        """The name, when it was just decided, and the arguments text read since the last ``take``."""
        name, arguments = self.sent_name, "".join(self.sent_arguments)
        self.sent_name, self.sent_arguments = None, []
        return name, arguments

    def _char(self, char: str) -> None:
        if self.state == "value":
            if self.value.take(char):
                self.raw.append(char)
                self.value_raw.append(char)
                if self.streaming and self.key == self.arguments_key:
                    self.sent_arguments.append(char)
                if self.value.done:
                    self._value_end()
                return
            self._value_end()
            if self.state != "after_value":
                return
        if self.state == "key":
            self.raw.append(char)
            self.value_raw.append(char)
            if self.value.take(char) and self.value.done:
                self._key_end()
            return
        if char in WHITESPACE:
            self.raw.append(char)
        elif self.state == "open" and char == "{":
            self._next("first_key", char)
        elif self.state in ("first_key", "next_key") and char == '"':
            self.value, self.value_raw = JsonValueScanner(), []
            self._next("key", char)
            self.value.take(char)
            self.value_raw.append(char)
        elif self.state == "colon" and char == ":":
            self._next("value_start", char)
        elif self.state == "value_start" and char in '"{[-0123456789tfn':
            self._value_start(char)
        elif self.state == "after_value" and char == ",":
            self._next("next_key", char)
        elif self.state == "after_value" and char == "}":
            self.raw.append(char)
            self._validate()
        else:
            self.state = "failed"

    def _next(self, state: str, char: str) -> None:
        self.raw.append(char)
        self.state = state

    def _key_end(self) -> None:
        key = _loads("".join(self.value_raw))
        repeated = key in self.keys or (key in ARGUMENT_KEYS and self.arguments_key is not None)
        if not isinstance(key, str) or repeated or (not self.keys and key not in FIRST_KEYS):
            self.state = "failed"
            return
        self.keys.append(key)
        if key in ARGUMENT_KEYS:
            self.arguments_key = key
        self.key, self.state = key, "colon"

    def _value_start(self, char: str) -> None:
        if (self.key == "name" and char != '"') or (self.bare and char != "{"):
            self.state = "failed"
            return
        self.value, self.value_raw = JsonValueScanner(), []
        self.state = "value"
        if self.key in ARGUMENT_KEYS and char == "{" and self.name is not None:
            self.streaming = True
            self.sent_name = self.name
        self._char(char)

    def _value_end(self) -> None:
        text, self.state = "".join(self.value_raw), "after_value"
        if self.key == "name":
            self.name = _loads(text)
            if not isinstance(self.name, str):
                self.state = "failed"
        elif self.key in ARGUMENT_KEYS:
            self.arguments_raw = text
        if self.bare:
            self._validate()

    def _validate(self) -> None:
        """The object is closed: accept it as a call only if it is valid JSON of the right shape."""
        call = {"name": self.name, self.key: _loads(self.arguments_raw)} if self.bare else _loads("".join(self.raw))
        arguments = self._arguments_text(call) if isinstance(call, dict) else None
        if arguments is None or not isinstance(call.get("name"), str):
            self.state = "failed"
            return
        self.state = "done"
        if not self.streaming:
            self.sent_name, self.sent_arguments = call["name"], [arguments]

    def _arguments_text(self, call: dict) -> str | None:
        if self.arguments_key is None:
            return None if self.arguments_required else "{}"
        value = call.get(self.arguments_key)
        if isinstance(value, dict):
            return self.arguments_raw
        if isinstance(value, str) and isinstance(_loads(value), dict):
            return value   # some models write the arguments object as a JSON string
        return None


def _loads(text: str):
    """The parsed JSON text, or None where it is not JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
