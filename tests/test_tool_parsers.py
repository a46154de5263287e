"""Tool call parsers: each format, malformed output as content, streaming that joins up to the whole-text parse
however the text is split, and the registry with a plugin's parser."""
from __future__ import annotations

import json
import keyword
import random

import pytest
from conftest import PLUGIN_SOURCES, install_plugins, run_python
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvserve.core.entrypoints.openai.tool_parsers import (BUILTIN_TOOL_PARSERS, ToolParser, get_tool_parser,
                                                          tool_parser_names)
from kvserve.plugins import hookimpl
from kvserve.plugins.manager import GENERAL_GROUP, PluginManager

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parser(name: str) -> ToolParser:
    return get_tool_parser(name, PluginManager(discover=False))(None)


def extracted(name: str, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    result = parser(name).extract(text)
    return result.content, [(call.name, call.arguments) for call in result.calls]


def streamed(name: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Content and (name, arguments) of each call, joined from the deltas of feeding ``pieces``."""
    stream = parser(name).stream()
    deltas = [stream.feed(piece) for piece in pieces]
    deltas.append(stream.finish())
    content, calls = "", []
    for delta in deltas:
        content += delta.content
        for call in delta.tool_calls:
            if call.index == len(calls):
                assert call.name, "a call's first delta carries its name"
                calls.append([call.name, ""])
            else:
                assert call.index == len(calls) - 1 and call.name is None, delta
            calls[call.index][1] += call.arguments
    return content, [tuple(call) for call in calls]


def splits(text: str, seed: int = 0) -> list[list[str]]:
    """The whole text, one character at a time, at every single point, and a few random ways."""
    rng = random.Random(seed)
    ways = [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        ways.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    return ways


def assert_streams_like_extract(name: str, text: str) -> None:
    content, calls = extracted(name, text)
    for pieces in splits(text):
        streamed_content, streamed_calls = streamed(name, pieces)
        assert (streamed_content if streamed_content.strip() else None, streamed_calls) == (content, calls), pieces


NESTED = {"query": 'say "hi" {not a brace} \\ back', "filters": {"tags": ["a}", "{b", []], "deep": {"x": {"y": None}}},
          "emoji": "café 🙂 中文", "n": -1.5e3, "ok": True}
NESTED_JSON = json.dumps(NESTED, ensure_ascii=False)

EXAMPLES = {
    "hermes": [
        ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": ' + NESTED_JSON + '}\n</tool_call>\n'
         '<tool_call>{"name": "f", "arguments": {}}</tool_call> Done.',
         "I will check.\n\n Done.", [("get_weather", NESTED_JSON), ("f", "{}")]),
        ('<tool_call>{"arguments": {"a": [1, 2]}, "name": "later"}</tool_call>', None, [("later", '{"a": [1, 2]}')]),
        ('<tool_call>{"name": "s", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("s", '{"a": 1}')]),
        ('<tool_call>{"name": "cut", "arguments": {"a": 1}}', None, [("cut", '{"a": 1}')]),
        ('<tool_call>{"name": "cut", "arguments": {"a": 1}}</tool_c', None, [("cut", '{"a": 1}')]),
        ("No tools needed, a < b and {x} stay.", "No tools needed, a < b and {x} stay.", []),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": ' + NESTED_JSON + '}; {"name": "f", "arguments": {"x": ";"}}',
         None, [("get_weather", NESTED_JSON), ("f", '{"x": ";"}')]),
        ('Sure.<|python_tag|>{"type": "function", "name": "g", "parameters": {}}\nAnd more.', "Sure.And more.",
         [("g", "{}")]),
        ('  {"name": "h", "parameters": {"q": "x"}};', None, [("h", '{"q": "x"}')]),
    ],
    "mistral": [
        ('Let me see.[TOOL_CALLS] [{"name": "get_weather", "arguments": ' + NESTED_JSON + '}, '
         '{"name": "f", "arguments": {}, "id": "abc123def"}] ok', "Let me see. ok",
         [("get_weather", NESTED_JSON), ("f", "{}")]),
        ("[TOOL_CALLS]get_weather[ARGS]" + NESTED_JSON + '[TOOL_CALLS]f{"x": 1}', None,
         [("get_weather", NESTED_JSON), ("f", '{"x": 1}')]),
        ('[TOOL_CALLS]{"name": "one", "arguments": {"a": "]"}}', None, [("one", '{"a": "]"}')]),
    ],
    "pythonic": [
        ("[get_weather(city='San Francisco', metric='celsius'), other(x=1, y=[1, {'a': None}], z=-2.5, t=True)]",
         None, [("get_weather", '{"city": "San Francisco", "metric": "celsius"}'),
                ("other", '{"x": 1, "y": [1, {"a": null}], "z": -2.5, "t": true}')]),
        ('<|python_start|>[tools.search(q="a) b\\" c]", n={"k": (1, 2)}, flag=false)]<|python_end|>then text',
         "then text", [("tools.search", '{"q": "a) b\\" c]", "n": {"k": [1, 2]}, "flag": false}')]),
        ("[noargs()]", None, [("noargs", "{}")]),
    ],
}


@pytest.mark.parametrize("name,text,content,calls", [(name, *case) for name, cases in EXAMPLES.items()
                                                      for case in cases])
def test_each_format_extracts_its_calls_and_content(name, text, content, calls):
    assert extracted(name, text) == (content, calls)
    for _, arguments in calls:
        assert isinstance(json.loads(arguments), dict)
    assert_streams_like_extract(name, text)


MALFORMED = {
    "hermes": ['<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>', "<tool_call>not json</tool_call>",
               '<tool_call>{"name": "f", "arguments": {"a": 1', '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
               '<tool_call>{"name": "f", "arguments": []}</tool_call>', '<tool_call>{"name": "f"} junk</tool_call>'],
    "llama3_json": ['{"answer": 42}', '{"name": "Bob", "age": 3}', 'Here: {"name": "f", "parameters": {}}',
                    '{"name": "f", "parameters": {}}; oops', '<|python_tag|>brave_search.call(query="x")'],
    "mistral": ['[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"bad": 1}]', "[TOOL_CALLS][]",
                "[TOOL_CALLS]f[ARGS]not json", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}'],
    "pythonic": ["[f(x=y)]", "[f(1)]", "[f(x=1), g(x=2]", "[1, 2] are numbers", "[f(x=1) + 2]", "[f(x={1, 2})]",
                 "[f(x=float('inf'))]", "[]", "[if(x=1)]"],
}


@pytest.mark.parametrize("name,text", [(name, text) for name, texts in MALFORMED.items() for text in texts])
def test_malformed_calls_are_content_never_lost(name, text):
    assert extracted(name, text) == (text, [])
    content, _ = streamed(name, list(text))
    assert content == text


def test_one_bad_call_among_good_ones_keeps_the_good_ones_and_the_bad_text():
    text = ('<tool_call>{"name": "a", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "b" "arguments": {}}</tool_call><tool_call>{"name": "c", "arguments": {}}</tool_call>')
    bad = '<tool_call>{"name": "b" "arguments": {}}</tool_call>'
    assert extracted("hermes", text) == (bad, [("a", "{}"), ("c", "{}")])
    assert_streams_like_extract("hermes", text)


def test_arguments_stream_before_the_call_closes_and_tags_never_leak_into_content():
    stream = parser("hermes").stream()
    assert stream.feed("Hi <tool_ca").content == "Hi "
    first = stream.feed('ll>{"name": "f", "arguments": {"city": "Pa')
    assert first.content == "" and first.tool_calls[0].name == "f"
    assert first.tool_calls[0].arguments == '{"city": "Pa'
    third = stream.feed('ris"}}</tool_call> <tool_')
    assert (third.content, third.tool_calls[0].arguments) == (" ", 'ris"}')
    assert stream.feed("x").content == "<tool_x"
    assert stream.finish().content == ""


def test_a_call_that_breaks_after_its_name_was_sent_comes_back_as_content():
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}} trailing</tool_call>'
    content, calls = streamed("hermes", list(text))
    assert content == text and calls == [("f", '{"a": 1}')]   # sent before the break showed; extract drops it
    assert extracted("hermes", text) == (text, [])


# -- properties over generated calls, and over arbitrary text ------------------------------------------------------

TRICKY = 'ab {}[]"\\\'/:,;<> é中🙂\n'
CONTENT = st.text('ab <>/{}[]":;\n é', max_size=12)
NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda n: not keyword.iskeyword(n))
KEYS = st.one_of(NAMES, st.text(TRICKY, max_size=5))
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.text(TRICKY, max_size=8)
                      | st.floats(allow_nan=False, allow_infinity=False),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=8)


def arguments(keys=KEYS):
    return st.dictionaries(keys, VALUES, max_size=4)


def rendered_json(draw, args: dict) -> str:
    return json.dumps(args, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))


@st.composite
def responses(draw, name: str):
    """(text, expected content, expected calls) of a generated response in format ``name``."""
    calls = [(draw(NAMES), draw(arguments(NAMES if name == "pythonic" else KEYS)))
             for _ in range(draw(st.integers(1, 3)))]
    before, after = draw(CONTENT), draw(CONTENT)
    rendered = [rendered_json(draw, args) for _, args in calls]
    if name == "hermes":
        parts = [f'<tool_call>\n{{"name": {json.dumps(n)}, "arguments": {a}}}\n</tool_call>' if draw(st.booleans())
                 else f'<tool_call>{{"arguments": {a}, "name": {json.dumps(n)}}}</tool_call>'
                 for (n, _), a in zip(calls, rendered)]
        text, outside = before + "\n".join(parts) + after, before + "\n" * (len(parts) - 1) + after
    elif name == "llama3_json":
        tag = draw(st.booleans())
        before = before if tag and before.strip() else ""   # blank text before the first call is markup
        after = "x" + after
        objects = [f'{{"name": {json.dumps(n)}, "{draw(st.sampled_from(["parameters", "arguments"]))}": {a}}}'
                   for (n, _), a in zip(calls, rendered)]
        text, outside = before + "<|python_tag|>" * tag + "; ".join(objects) + after, before + after
    elif name == "mistral" and draw(st.booleans()):
        objects = [f'{{"name": {json.dumps(n)}, "arguments": {a}}}' for (n, _), a in zip(calls, rendered)]
        text, outside = before + "[TOOL_CALLS][" + ", ".join(objects) + "]" + after, before + after
    elif name == "mistral":
        text = before + "".join(f"[TOOL_CALLS]{n}{draw(st.sampled_from(['[ARGS]', '']))}{a}"
                                for (n, _), a in zip(calls, rendered)) + after
        outside = before + after
    else:
        rendered = [json.dumps(args, ensure_ascii=False) for _, args in calls]
        text = "[" + ", ".join(f"{n}({', '.join(f'{k}={v!r}' for k, v in args.items())})" for n, args in calls)
        text, outside = text + "]" + after, after
    return text, outside if outside.strip() else None, [(n, a) for (n, _), a in zip(calls, rendered)]


@pytest.mark.parametrize("name", sorted(BUILTIN_TOOL_PARSERS))
@FAST
@given(data=st.data())
def test_generated_calls_parse_exactly_and_stream_the_same_in_any_pieces(name, data):
    text, content, calls = data.draw(responses(name))
    assert extracted(name, text) == (content, calls)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=10)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    for way in (pieces, list(text)):
        streamed_content, streamed_calls = streamed(name, way)
        assert (streamed_content if streamed_content.strip() else None, streamed_calls) == (content, calls)


FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool_", "{", "}", "[", "]", '"', "\\", ",", ":", ";", " ", "\n", "a",
             "é", '"name"', '"arguments"', '"parameters"', '"f"', "1", "tru", "[TOOL_CALLS]", "[ARGS]", "[TOOL",
             "<|python_tag|>", "<|python_start|>", "<|python_end|>", "f(", "x=", ")", "'", "<|py"]


@pytest.mark.parametrize("name", sorted(BUILTIN_TOOL_PARSERS))
@FAST
@given(text=st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join), seed=st.integers(0, 1000))
def test_any_text_parses_without_error_and_streams_the_same_however_split(name, text, seed):
    content, calls = extracted(name, text)
    whole = streamed(name, [text])
    for pieces in (list(text), splits(text, seed)[-1]):
        assert streamed(name, pieces) == whole
    assert (whole[0] if whole[0].strip() else None) == content
    remaining = iter(whole[1])
    assert all(call in remaining for call in calls), "extract's calls are the streamed ones less withdrawn ones"


# -- registry -------------------------------------------------------------------------------------------------------

def test_builtin_names_and_unknown_name_lists_them():
    plugins = PluginManager(discover=False)
    assert tool_parser_names(plugins) == ["hermes", "llama3_json", "mistral", "pythonic"]
    with pytest.raises(ValueError, match="unknown tool call parser 'nope'; available: hermes, llama3_json, "
                                         "mistral, pythonic"):
        get_tool_parser("nope", plugins)


class Registers:
    def __init__(self, parsers: dict):
        self.parsers = parsers

    @hookimpl
    def register_tool_parsers(self):
        return self.parsers


class Renamed(ToolParser):
    name = "hermes"


def test_plugin_parsers_may_not_take_builtin_names_twice_or_be_anything_else():
    def manager(*registered: dict) -> PluginManager:
        plugins = PluginManager(discover=False)
        for number, parsers in enumerate(registered):
            plugins.register(Registers(parsers), f"p{number}", GENERAL_GROUP)
        return plugins

    with pytest.raises(ValueError, match=rf"'hermes' \({Renamed.__module__}.Renamed\) under the name of kvserve's "
                                         r"built-in kvserve.core.entrypoints.openai.tool_parsers.hermes.Hermes"):
        get_tool_parser("hermes", manager({"hermes": Renamed}))
    with pytest.raises(ValueError, match="tool call parser 'mine' is registered by two plugins"):
        tool_parser_names(manager({"mine": Renamed}, {"mine": type("Other", (ToolParser,), {})}))
    with pytest.raises(TypeError, match="'mine' as <class 'str'>, which is not a subclass of "):
        tool_parser_names(manager({"mine": str}))
    assert get_tool_parser("mine", manager({"mine": Renamed})) is Renamed


PLUGIN_PARSERS = """
import json
from kvserve.core.entrypoints.openai.reasoning_parsers import get_reasoning_parser, reasoning_parser_names
from kvserve.core.entrypoints.openai.tool_parsers import get_tool_parser, tool_parser_names
from kvserve.plugins.manager import PluginManager
call = get_tool_parser("function_tag")(None).extract('Hi <function_call>{"name": "f", "arguments": {"a": 1}}'
                                                      '</function_call>')
try:
    get_tool_parser("nope")
except ValueError as exc:
    missing = str(exc)
print(json.dumps(dict(tools=tool_parser_names(), reasoning=reasoning_parser_names(), content=call.content,
                      calls=[[c.name, c.arguments] for c in call.calls], missing=missing,
                      split=get_reasoning_parser("bracket_think")(None).extract("[THINK]hmm[/THINK]ok"),
                      status={r.name: r.status for r in PluginManager().records}["toy-parsers"])))
"""


def test_a_plugin_installed_with_an_entry_point_adds_its_parsers(tmp_path_factory):
    site = install_plugins(tmp_path_factory.mktemp("parser_plugin"), [PLUGIN_SOURCES / "tool_parser_plugin"])
    result = json.loads(run_python(site, ["-c", PLUGIN_PARSERS]).splitlines()[-1])
    assert result["status"] == "loaded"
    assert result["tools"] == ["function_tag", "hermes", "llama3_json", "mistral", "pythonic"]
    assert result["reasoning"] == ["bracket_think", "deepseek_r1", "qwen3"]
    assert (result["content"], result["calls"]) == ("Hi ", [["f", '{"a": 1}']])
    assert result["split"] == ["hmm", "ok"]
    assert "'nope'; available: function_tag, hermes, llama3_json, mistral, pythonic" in result["missing"]
