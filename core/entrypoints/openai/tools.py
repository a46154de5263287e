"""Tool calling in chat completions: the request's tools and tool_choice checked, the constraint that "required"
and a named function put on the output, and each reply's text split into reasoning, content and tool calls, whole
or a delta at a time (the same parsers both ways, so that a streamed reply joins up to the whole one)."""
from __future__ import annotations

import copy
import re
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from kvserve.core.entrypoints.openai.reasoning_parsers import ReasoningParser, get_reasoning_parser
from kvserve.core.entrypoints.openai.tool_parsers import (FunctionCall, StreamDelta, ToolCallStream, ToolParser,
                                                          get_tool_parser, tool_parser_names)
from kvserve.core.entrypoints.openai.tool_parsers.mistral import MistralStream
from kvserve.core.structured_outputs.params import StructuredOutputsParams, parse_json_schema
from kvserve.plugins.manager import PluginManager

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TOOL_KEYS, FUNCTION_KEYS = {"type", "function"}, {"name", "description", "parameters", "strict"}
CHOICES = "'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ReplyParsers:
    """The server's parsers of replies: ``tool`` for tool_choice auto (--enable-auto-tool-choice
    --tool-call-parser NAME), ``reasoning`` for reasoning_content (--reasoning-parser NAME)."""

    tool: type[ToolParser] | None = None
    reasoning: type[ReasoningParser] | None = None


def reply_parsers(enable_auto_tool_choice: bool, tool_call_parser: str | None,
                  reasoning_parser: str | None) -> ReplyParsers:
    """The server's parsers by their names (plugins' too); a ValueError naming the options if they do not fit."""
    plugins = PluginManager()
    if enable_auto_tool_choice != (tool_call_parser is not None):
        raise ValueError("--enable-auto-tool-choice and --tool-call-parser NAME go together (NAME: "
                         f"{', '.join(tool_parser_names(plugins))})")
    return ReplyParsers(None if tool_call_parser is None else get_tool_parser(tool_call_parser, plugins),
                        None if reasoning_parser is None else get_reasoning_parser(reasoning_parser, plugins))


@dataclass
class ToolPlan:
    """How a request's reply is read: ``mode`` none, auto (the server's parser finds calls in free text),
    required (a grammar-constrained JSON list of calls) or named (the output is the named function's arguments)."""

    mode: str
    parameters: dict[str, Any]      # function name -> its parameters schema
    named: str | None = None
    constraint: StructuredOutputsParams | None = None


def plan_tools(tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool,
               auto_parser: type[ToolParser] | None) -> ToolPlan | None:
    """The request's tool plan (None without tools); a ValueError naming the field for anything malformed."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ValueError(f"tool_choice {tool_choice!r} needs tools: declare the functions it may call")
        return None
    parameters = check_tools(tools)
    if tool_choice == "none":
        return ToolPlan("none", parameters)
    if tool_choice in (None, "auto"):
        if auto_parser is None:
            field = "tool_choice 'auto'" if tool_choice else "tools without tool_choice mean tool_choice 'auto', which"
            raise ValueError(f"{field} needs the server started with --enable-auto-tool-choice --tool-call-parser "
                             f"NAME; else set tool_choice to {CHOICES}")
        return ToolPlan("auto", parameters)
    if tool_choice == "required":
        return ToolPlan("required", parameters, constraint=StructuredOutputsParams(
            json=calls_schema(parameters, parallel_tool_calls)))
    named = isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(
        tool_choice.get("function"), dict)
    name = tool_choice["function"].get("name") if named else None
    if not isinstance(name, str):
        raise ValueError(f"tool_choice must be {CHOICES}, got {tool_choice!r}")
    if name not in parameters:
        raise ValueError(f"tool_choice names function {name!r}, which tools does not declare; declared: "
                         f"{', '.join(parameters)}")
    return ToolPlan("named", parameters, name, StructuredOutputsParams(json=parameters[name]))


def check_tools(tools: Any) -> dict[str, Any]:
    """Each declared function's parameters schema, by name."""
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got {tools!r}")
    parameters: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ValueError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}, "
                             f"got {tool!r}")
        function = tool["function"]
        unknown = sorted(set(tool) - TOOL_KEYS) + [f"function.{k}" for k in sorted(set(function) - FUNCTION_KEYS)]
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; a function takes {', '.join(sorted(FUNCTION_KEYS))}")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise ValueError(f"{where}.function.name must be 1 to 64 letters, digits, _, . or -, got {name!r}")
        if name in parameters:
            raise ValueError(f"{where}.function.name {name!r} is declared twice")
        schema = function.get("parameters")
        parameters[name] = ANY_OBJECT if schema is None else parse_json_schema(schema, f"{where}.function.parameters")
    return parameters


def calls_schema(parameters: dict[str, Any], parallel: bool) -> dict:
    """A JSON list of one call (or more, if ``parallel``), each {"name": a declared function, "arguments": its
    parameters}; each schema's $defs move to the list's, since their references start at the root."""
    definitions: dict[str, Any] = {}
    variants = []
    for name, schema in parameters.items():
        schema = copy.deepcopy(schema) if isinstance(schema, dict) else schema
        for key, value in (schema.pop("$defs", {}) if isinstance(schema, dict) else {}).items():
            if definitions.setdefault(key, value) != value:
                raise ValueError(f"tools define $defs {key!r} differently in two functions; rename one")
        variants.append({"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
                         "required": ["name", "arguments"], "additionalProperties": False})
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": variants}, **({} if parallel else {"maxItems": 1})}
    return {**schema, "$defs": definitions} if definitions else schema


class RequiredCallsParser(ToolParser):
    """The JSON list of calls that tool_choice "required" constrains the output to."""

    name: ClassVar[str] = "required"

    def stream(self) -> ToolCallStream:
        stream = MistralStream()   # its reader of a list of JSON calls, without the [TOOL_CALLS] marker
        stream._begin_region()
        stream.mode = "after_marker"
        return stream


class NamedCallParser(ToolParser):
    """The arguments of the function tool_choice names: the whole output."""

    name: ClassVar[str] = "named"

    def __init__(self, function: str):
        super().__init__()
        self.function = function

    def stream(self) -> ToolCallStream:
        return NamedCallStream(self.function)


class NamedCallStream(ToolCallStream):
    def __init__(self, function: str):
        super().__init__()
        self._begin_region()
        self._begin_call(function)

    def _advance(self, final: bool) -> None:
        self._arguments(self._pending)
        self._pending = ""
        if final:
            self._close_region()


class ReplyReader:
    """Splits one choice's text into reasoning, content and tool calls: ``whole`` for a reply, ``feed``/``finish``
    for the delta payloads of a stream."""

    def __init__(self, plan: ToolPlan | None, auto_parser: ToolParser | None, reasoning: ReasoningParser | None):
        mode = "none" if plan is None else plan.mode
        self.tools = {"none": None, "auto": auto_parser, "required": RequiredCallsParser(),
                      "named": NamedCallParser(plan.named) if mode == "named" else None}[mode]
        self.finish_as_calls = mode in ("auto", "required")   # OpenAI's "tool_calls", but "stop" for a named one
        self.reasoning = reasoning
        self.reasoning_stream = reasoning.stream() if reasoning else None
        self.tool_stream = self.tools.stream() if self.tools else None
        self.ids: list[str] = []

    def whole(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """(message, finish reason) of a finished reply."""
        reasoning, content = self.reasoning.extract(text) if self.reasoning else (None, text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.reasoning is not None:
            message["reasoning_content"] = reasoning
        if self.tools is not None:
            extracted = self.tools.extract(content or "")
            message["content"] = extracted.content
            if extracted.calls:
                message["tool_calls"] = [self._call(i, call) for i, call in enumerate(extracted.calls)]
            finish_reason = self._finish_reason(finish_reason, bool(extracted.calls))
        return message, finish_reason

    def feed(self, text: str) -> list[dict]:
        return self._deltas(*(self.reasoning_stream.feed(text) if self.reasoning_stream else ("", text)), False)

    def finish(self, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """The deltas held back until the end, and the reply's finish reason."""
        deltas = self._deltas(*(self.reasoning_stream.finish() if self.reasoning_stream else ("", "")), True)
        return deltas, self._finish_reason(finish_reason, bool(self.ids))

    def _deltas(self, reasoning: str, content: str, final: bool) -> list[dict]:
        deltas = [{"reasoning_content": reasoning}] if reasoning else []
        if self.tool_stream is None:
            return deltas + ([{"content": content}] if content else [])
        parsed = StreamDelta()
        for piece in [self.tool_stream.feed(content)] + ([self.tool_stream.finish()] if final else []):
            parsed.content += piece.content
            parsed.tool_calls += piece.tool_calls
        if parsed.content:
            deltas.append({"content": parsed.content})
        calls = []
        for call in parsed.tool_calls:
            if call.name is not None:
                calls.append({"index": call.index, **self._call(call.index, FunctionCall(call.name, call.arguments))})
            else:
                calls.append({"index": call.index, "function": {"arguments": call.arguments}})
        return deltas + ([{"tool_calls": calls}] if calls else [])

    def _call(self, index: int, call: FunctionCall) -> dict:
        while len(self.ids) <= index:
            self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
        return {"id": self.ids[index], "type": "function", "function": {"name": call.name, "arguments": call.arguments}}

    def _finish_reason(self, reason: str | None, called: bool) -> str | None:
        return "tool_calls" if reason == "stop" and called and self.finish_as_calls else reason
