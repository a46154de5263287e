"""What a tool call parser returns, and the incremental reader every built-in parser is made of.

A parser reads the model's text in order through its stream; ``extract`` is that same stream fed the whole text,
so a response parses the same streamed or not, however the text was split into deltas.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class FunctionCall:
    """One complete tool call: the function's name and its arguments as the JSON text of an object."""

    name: str
    arguments: str


@dataclass
class ExtractedToolCalls:
    """A whole response split into its tool calls and the text outside them (None when that is only whitespace)."""

    content: str | None
    calls: list[FunctionCall]


@dataclass
class ToolCallDelta:
    """The next piece of call ``index``: its name in the call's first delta only, then pieces of its arguments."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamDelta:
    """What one piece of generated text adds to the response: content text and pieces of tool calls."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class ToolCallStream:
    """Reads one response a piece at a time.

    Text that may still turn out to be tool-call markup (the start of a tag) is held back until it is decided.
    A call's name is sent once the parser is sure of it, and its arguments as they arrive. Markup that proves not
    to be a valid tool call (bad JSON, a missing closing tag at the end) comes back as content, whole; the pieces
    of a call already sent for it cannot be taken back, and ``extract`` leaves that call out. After such a failure
    the subclass goes on in its content mode, which rereads the markup after its opening tag.

    Subclasses implement ``_advance(final)``: consume ``self._pending`` as far as it is decided, through the
    ``_content``, ``_begin_region``, ``_consume``, ``_begin_call``, ``_arguments``, ``_close_region`` and
    ``_fail_region`` steps below; with ``final`` nothing more will come, so everything must be decided.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._events: list[tuple[Any, ...]] = []
        self._next_index = 0
        self._region: list[str] | None = None   # the markup read so far, while inside a tool-call region
        self._region_calls: list[int] = []

    def feed(self, delta: str) -> StreamDelta:
        """Read the next piece of generated text, as detokenized; returns what it decided."""
        return _merge(self._feed_events(delta))

    def finish(self) -> StreamDelta:
        """End of generation: decide and return whatever was held back."""
        return _merge(self._finish_events())

    def _feed_events(self, delta: str) -> list[tuple[Any, ...]]:
        self._pending += delta
        self._advance(final=False)
        return self._take_events()

    def _finish_events(self) -> list[tuple[Any, ...]]:
        self._advance(final=True)
        if self._region is not None:   # a subclass that left its region open: its text is content
            self._fail_region()
        if self._pending:
            self._content(self._pending)
            self._pending = ""
        return self._take_events()

    def _advance(self, final: bool) -> None:
        raise NotImplementedError

    def _take_events(self) -> list[tuple[Any, ...]]:
        events, self._events = self._events, []
        return events

    # -- steps for subclasses ----------------------------------------------------------------------------------

    def _content(self, text: str) -> None:
        if text:
            self._events.append(("content", text))

    def _content_until(self, marker: str, final: bool) -> bool:
        """Send pending text as content up to ``marker``; True when the marker was found (and taken off pending).
        Without it, a tail that could be the marker's start stays pending, unless ``final``."""
        at = self._pending.find(marker)
        if at >= 0:
            self._content(self._pending[:at])
            self._pending = self._pending[at + len(marker):]
            return True
        keep = 0 if final else partial_marker_length(self._pending, marker)
        self._content(self._pending[:len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep:]
        return False

    def _begin_region(self, markup: str = "") -> None:
        self._region, self._region_calls = [markup], []

    def _consume(self, count: int) -> None:
        """Move the first ``count`` pending characters into the current region's markup."""
        self._region.append(self._pending[:count])
        self._pending = self._pending[count:]

    def _skip_space(self) -> None:
        self._consume(len(self._pending) - len(self._pending.lstrip()))

    def _expect(self, literal: str) -> bool | None:
        """Consume ``literal`` if pending starts with it: True; None while pending is a part of it; else False."""
        if self._pending.startswith(literal):
            self._consume(len(literal))
            return True
        return None if literal.startswith(self._pending) else False

    def _begin_call(self, name: str) -> None:
        self._events.append(("call", self._next_index, name))
        self._region_calls.append(self._next_index)
        self._next_index += 1

    def _arguments(self, text: str) -> None:
        if text:
            self._events.append(("arguments", self._next_index - 1, text))

    def _read_call(self, reader) -> str:
        """Feed pending text to a ``JsonCallReader`` (or a reader of its interface), sending what it decided;
        returns its state: "done", "failed", or anything else while it needs more."""
        self._consume(reader.read(self._pending))
        name, arguments = reader.take()
        if name is not None:
            self._begin_call(name)
        self._arguments(arguments)
        return reader.state

    def _close_region(self) -> None:
        """The region was valid markup: its calls stand. A region without calls is content after all."""
        if not self._region_calls:
            self._fail_region()
            return
        self._region = None

    def _fail_region(self) -> None:
        """The region was not a valid tool call: its calls are withdrawn, its opening markup is content, and the
        text after that is read again (as the subclass's content mode reads), for a tag it may hold."""
        opening, rest = self._region[0], "".join(self._region[1:])
        self._region = None
        if self._region_calls:
            self._events.append(("withdrawn", self._region_calls))
        self._content(opening)
        self._pending = rest + self._pending


class ToolParser:
    """Turns a model's generated text into OpenAI tool calls, for ``--tool-call-parser NAME``.

    Subclasses set ``name`` and implement ``stream()``, returning a new ``ToolCallStream`` for each response;
    ``extract`` reads a whole response through one (a parser whose stream is not a ``ToolCallStream`` overrides
    ``extract`` too). A parser never raises on model output: text that is not a complete, valid tool call is
    content.
    """

    name: ClassVar[str]
    # False for formats whose markers are special tokens, which the server then keeps in the text it parses
    skip_special_tokens: ClassVar[bool] = True

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def stream(self) -> ToolCallStream:
        """A new incremental parser for one response."""
        raise NotImplementedError

    def extract(self, text: str) -> ExtractedToolCalls:
        """The tool calls of a whole response, and its text outside them."""
        stream = self.stream()
        events = stream._feed_events(text) + stream._finish_events()
        content: list[str] = []
        calls: dict[int, FunctionCall] = {}
        for event in events:
            if event[0] == "content":
                content.append(event[1])
            elif event[0] == "call":
                calls[event[1]] = FunctionCall(event[2], "")
            elif event[0] == "arguments":
                calls[event[1]].arguments += event[2]
            else:
                for index in event[1]:
                    del calls[index]
        outside = "".join(content)
        return ExtractedToolCalls(outside if outside.strip() else None, list(calls.values()))


def _merge(events: list[tuple[Any, ...]]) -> StreamDelta:
    """One delta for a feed's events: content joined, and one ToolCallDelta per call in a row."""
    delta = StreamDelta()
    for event in events:
        if event[0] == "content":
            delta.content += event[1]
        elif event[0] == "call":
            delta.tool_calls.append(ToolCallDelta(event[1], name=event[2]))
        elif event[0] == "arguments":
            if not delta.tool_calls or delta.tool_calls[-1].index != event[1]:
                delta.tool_calls.append(ToolCallDelta(event[1]))
            delta.tool_calls[-1].arguments += event[2]
    return delta


def partial_marker_length(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that ``marker`` starts with (but is not all of)."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0
