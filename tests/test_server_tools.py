"""Tool calling and reasoning over HTTP on SmolLM2 with a tool-aware chat template: required and named calls
always parse and validate, streamed calls reassemble to the unstreamed ones, tool results round-trip, reasoning
moves into reasoning_content, and bad tools get a 400 naming the field."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
from server_utils import DEFAULT_NAME, assert_error, openai_client, post, start_server, stop_server

pytestmark = pytest.mark.slow

TEMPLATE = Path(__file__).parents[1] / "examples" / "tool_chat_template_chatml_hermes.jinja"
CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                        "b": {"type": "integer", "minimum": -99, "maximum": 99}},
       "required": ["a", "b"]}
ITEM = {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}},
        "required": ["sku"]}
ORDER = {"type": "object", "$defs": {"item": ITEM}, "required": ["items"],
         "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 2}}}
SCHEMAS = {"get_weather": WEATHER, "add": ADD, "order": ORDER}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"The {name} function",
                                           "parameters": schema}} for name, schema in SCHEMAS.items()]


@pytest.fixture(scope="module")
def server():
    server = start_server(["--max-model-len", "2048", "--kv-cache-memory", "256MiB", "--dtype", "float32",
                           "--chat-template", str(TEMPLATE), "--enable-auto-tool-choice",
                           "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"])
    yield server
    stop_server(server)


def calls_of(message) -> list[tuple[str, str]]:
    return [(call.function.name, call.function.arguments) for call in message.tool_calls or []]


def assert_valid_calls(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_required_and_named_calls_always_parse_and_validate(server):
    client = openai_client(server, timeout=600)
    for seed in range(4):
        fields = dict(model=DEFAULT_NAME, messages=QUESTION, tools=TOOLS, max_tokens=120, temperature=1.0, seed=seed)
        required = client.chat.completions.create(**fields, tool_choice="required", parallel_tool_calls=False)
        assert required.choices[0].finish_reason == "tool_calls"
        assert len(calls_of(required.choices[0].message)) == 1
        assert_valid_calls(calls_of(required.choices[0].message))
        for name in SCHEMAS:
            named = client.chat.completions.create(**fields, tool_choice={"type": "function",
                                                                         "function": {"name": name}})
            assert named.choices[0].finish_reason == "stop" and named.choices[0].message.content is None
            calls = calls_of(named.choices[0].message)
            assert [call[0] for call in calls] == [name]
            assert_valid_calls(calls)


def streamed(client, **fields) -> tuple[str, list[tuple[str, str]], str | None, list[str]]:
    """(content, [(name, arguments)], finish reason, ids) joined from a streamed reply."""
    content, calls, finish, ids = "", {}, None, []
    for chunk in client.chat.completions.create(**fields, stream=True):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            if call.id is not None:
                assert call.index == len(calls) and call.function.name, call
                calls[call.index] = [call.function.name, ""]
                ids.append(call.id)
            else:
                assert call.function.name is None, call
            calls[call.index][1] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [tuple(call) for call in calls.values()], finish, ids


# SmolLM2 calls tools in parallel until max_tokens, whose cut a streamed reply cannot take back: one call here.
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "order"}}])
def test_streamed_tool_calls_reassemble_to_the_unstreamed_ones(server, tool_choice):
    client = openai_client(server, timeout=600)
    fields = dict(model=DEFAULT_NAME, messages=QUESTION, tools=TOOLS, tool_choice=tool_choice, max_tokens=200,
                  temperature=0, parallel_tool_calls=False)
    whole = client.chat.completions.create(**fields).choices[0]
    content, calls, finish, ids = streamed(client, **fields)
    assert calls == calls_of(whole.message) and finish == whole.finish_reason and len(set(ids)) == len(ids)
    assert content == "" and whole.message.content is None
    assert_valid_calls(calls)


def test_auto_round_trips_a_tool_result(server):
    client = openai_client(server, timeout=600)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    dialogue = [{"role": "developer", "content": "Answer briefly."}, *QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny"}]
    fields = dict(model=DEFAULT_NAME, tools=TOOLS, max_tokens=60, temperature=0)
    reply = client.chat.completions.create(messages=dialogue, **fields)
    shorter = client.chat.completions.create(messages=dialogue[:2], **fields)
    assert reply.usage.prompt_tokens > shorter.usage.prompt_tokens + 20   # the call and its result were rendered
    message = reply.choices[0].message
    if message.tool_calls:
        assert reply.choices[0].finish_reason == "tool_calls"
        assert_valid_calls(calls_of(message))
    else:
        assert message.content
    content, calls, finish, _ = streamed(client, messages=dialogue, **fields)
    assert (content or None, calls, finish) == (message.content, calls_of(message), reply.choices[0].finish_reason)


def test_reasoning_moves_into_reasoning_content_streamed_or_not(server):
    client = openai_client(server)
    fields = dict(model=DEFAULT_NAME, messages=QUESTION, max_tokens=60, temperature=0,
                  extra_body={"guided_regex": r"<think>[a-z]{2,9}( [a-z]{2,9}){0,3}</think>[A-Z][a-z ]{1,30}\."})
    message = client.chat.completions.create(**fields).choices[0].message
    assert message.reasoning_content and message.content and "think>" not in message.reasoning_content + message.content
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(**fields, stream=True):
        reasoning += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
        content += chunk.choices[0].delta.content or ""
    assert (reasoning, content) == (message.reasoning_content, message.content)


NAMELESS = [{"type": "function", "function": {"parameters": ADD}}]
BAD_SCHEMA = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]


@pytest.mark.parametrize("fields, param, message", [
    ({"tools": NAMELESS, "tool_choice": "required"}, "tools", "tools[0].function.name must be 1 to 64"),
    ({"tools": BAD_SCHEMA, "tool_choice": "required"}, "tools", "tools[0].function.parameters is not a valid JSON"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "tool_choice names function 'nope', which tools does not declare; declared: get_weather, add, order"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be 'none', 'auto', 'required'"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools", "tools[3].function.name 'get_weather' is declared twice"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format",
     "response_format cannot be combined with tools unless tool_choice is 'none'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parametres": {}}}]}, "tools",
     "unknown keys ['function.parametres']"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages", "tool_call_id belongs to, and is required on"),
])
def test_bad_tools_get_a_400_naming_the_field_and_the_server_goes_on(server, fields, param, message):
    body = {"model": DEFAULT_NAME, "messages": QUESTION, "max_tokens": 5, **fields}
    assert_error(post(server, CHAT, body), 400, param, message)
    assert post(server, CHAT, {"model": DEFAULT_NAME, "messages": QUESTION, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("args, message", [
    (["--tool-call-parser", "nope", "--enable-auto-tool-choice"],
     "unknown tool call parser 'nope'; available: hermes, llama3_json, mistral, pythonic"),
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice and --tool-call-parser NAME go together"),
    (["--reasoning-parser", "nope"], "unknown reasoning parser 'nope'; available: deepseek_r1, qwen3"),
])
def test_unknown_parsers_stop_the_server_before_it_loads(args, message):
    result = subprocess.run(["kvserve", "serve", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
