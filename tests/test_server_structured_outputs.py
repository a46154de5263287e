"""Structured outputs over HTTP on SmolLM2 with the official client: response_format with generated pydantic
models, vLLM's structured_outputs and guided_* fields, streaming, and a 400 naming the field for bad input."""
from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal, Optional, Union, get_origin

import jsonschema
import pydantic
import pytest
from server_utils import DEFAULT_NAME, assert_error, openai_client, post, start_server, stop_server

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Fill in a record about a city."}]
MAX_BYTES = 4096


@pytest.fixture(scope="module")
def server():
    server = start_server(["--max-model-len", "1024", "--kv-cache-memory", "256MiB", "--dtype", "float32",
                           "--structured-outputs-max-bytes", str(MAX_BYTES)])
    yield server
    stop_server(server)


def random_field(rng: random.Random, depth: int):
    """The annotation of a random field: bounded strings and numbers (integers: a model writes a float's decimals
    for as long as it likes), enums, booleans, arrays with bounds, nested models and optional fields."""
    kind = rng.choice(["str", "int", "enum", "bool", "array", "nested" if depth < 1 else "int", "optional"])
    if kind == "str":
        return Annotated[str, pydantic.Field(max_length=rng.randint(3, 16))]
    if kind == "int":
        low = rng.randint(-50, 50)
        return Annotated[int, pydantic.Field(ge=low, le=low + rng.randint(1, 1000))]
    if kind == "enum":
        return Literal[tuple(rng.sample(["north", "south", "east", "west", "up"], rng.randint(2, 4)))]
    if kind == "bool":
        return bool
    if kind == "array":
        low = rng.randint(0, 2)
        item = rng.choice([Literal["x", "y", "z"], Annotated[int, pydantic.Field(ge=0, le=99)]])
        return Annotated[list[item], pydantic.Field(min_length=low, max_length=low + rng.randint(0, 2))]
    if kind == "nested":
        return random_model(rng, depth + 1)
    return Optional[random_field(rng, depth + 1)]


def random_model(rng: random.Random, depth: int = 0) -> type[pydantic.BaseModel]:
    names = rng.sample(["name", "country", "population", "area", "rank", "tags", "coast", "mayor", "ratio", "info"],
                       rng.randint(1, 4))
    fields = {name: random_field(rng, depth) for name in names}
    return pydantic.create_model(f"Model{rng.randrange(10**6)}", **{
        name: (annotation, None if get_origin(annotation) is Union else ...) for name, annotation in fields.items()})


def test_parse_returns_a_valid_object_for_twenty_generated_schemas(server):
    client = openai_client(server, timeout=600)
    models = [random_model(random.Random(seed)) for seed in range(20)]

    def parse(model: type[pydantic.BaseModel]):
        return client.beta.chat.completions.parse(model=DEFAULT_NAME, messages=MESSAGES, response_format=model,
                                                  max_tokens=300, temperature=0)

    with ThreadPoolExecutor(len(models)) as pool:
        completions = list(pool.map(parse, models))
    for model, completion in zip(models, completions):
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop", message.content
        assert isinstance(message.parsed, model)
        jsonschema.validate(json.loads(message.content), model.model_json_schema())


def test_regex_choice_and_grammar_hold_on_every_sampled_output(server):
    client = openai_client(server)
    cases = [({"guided_regex": r"[A-Z][a-z]{2,8} \d{1,3}"}, r"[A-Z][a-z]{2,8} \d{1,3}"),
             ({"structured_outputs": {"choice": ["alpha", "beta gamma", "δ"]}}, r"alpha|beta gamma|δ"),
             ({"guided_grammar": 'root ::= ("ab" | "c")+ "!"'}, r"(ab|c)+!")]
    for fields, language in cases:
        completion = client.completions.create(model=DEFAULT_NAME, prompt="Answer:", n=4, seed=7, temperature=1.0,
                                               max_tokens=40, extra_body=fields)
        for choice in completion.choices:
            if choice.finish_reason == "stop":
                assert re.fullmatch(language, choice.text), (fields, choice.text)
            else:   # cut off by max_tokens: a prefix of the language
                assert choice.finish_reason == "length" and "+" in language, (fields, choice.text)


def test_a_streamed_json_schema_reply_is_the_unstreamed_one(server):
    client = openai_client(server)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "sunny": {"type": "boolean"}}, "required": ["city", "sunny"]}
    fields = dict(model=DEFAULT_NAME, messages=MESSAGES, max_tokens=60, temperature=0,
                  response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
    whole = client.chat.completions.create(**fields).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        **fields, stream=True) if chunk.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), schema)
    reply = client.chat.completions.create(**{**fields, "response_format": {"type": "json_object"}})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


TOO_LARGE = {"type": "object", "properties": {f"field_{i}": {"type": "integer"} for i in range(300)}}


@pytest.mark.parametrize("fields, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "response_format.json_schema.schema is not a valid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "response_format.json_schema.schema is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "stritc": True}}},
     "response_format", "unknown keys ['stritc']"),
    ({"response_format": {"type": "xml"}}, "response_format", "must be one of text, json_object, json_schema"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "guided_regex cannot be compiled"),
    ({"guided_choice": []}, "guided_choice", "guided_choice must be a non-empty list of strings"),
    ({"guided_grammar": "root ::= nothing_defined"}, "guided_grammar", "guided_grammar cannot be compiled"),
    ({"structured_outputs": {"jsn": {"type": "object"}}}, "structured_outputs", "unknown keys ['jsn']"),
    ({"structured_outputs": {"json": "{"}}, "structured_outputs", "structured_outputs.json is not valid JSON"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "set only one of them"),
    ({"guided_json": TOO_LARGE}, "guided_json", f"over the limit of {MAX_BYTES} (structured_outputs_max_bytes)"),
    ({"structured_outputs": {"regex": "a+"}, "min_tokens": 3}, "min_tokens", "min_tokens cannot be combined"),
    ({"guided_choice": ["a"], "use_beam_search": True}, "guided_choice", "cannot be used with use_beam_search"),
])
def test_bad_constraints_get_a_400_naming_the_field_and_the_server_goes_on(server, fields, param, message):
    body = {"model": DEFAULT_NAME, "messages": MESSAGES, "max_tokens": 5, **fields}
    assert_error(post(server, CHAT, body), 400, param, message)
    reply = post(server, CHAT, {"model": DEFAULT_NAME, "messages": MESSAGES, "max_tokens": 3,
                                "guided_choice": ["fine"]})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "fine", reply.text
