"""The request fields that constrain the output (OpenAI's response_format, vLLM's structured_outputs and its
older guided_* names), read into one StructuredOutputsParams; errors name the field the client sent."""
from __future__ import annotations

import re
from typing import Any

from kvserve.core.structured_outputs.params import KINDS, StructuredOutputsParams, parse_json_schema

GUIDED = ("json", "regex", "choice", "grammar")
RESPONSE_FORMATS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}
SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def request_constraint(request: Any) -> StructuredOutputsParams | None:
    """The request's constraint, or None; a ValueError naming the field if the request sets several or a
    malformed one."""
    given: dict[str, dict] = {}
    if request.structured_outputs is not None:
        if not isinstance(request.structured_outputs, dict):
            raise ValueError(f"structured_outputs must be an object with one of {', '.join(KINDS)}")
        unknown = sorted(set(request.structured_outputs) - set(KINDS))
        if unknown:
            raise ValueError(f"structured_outputs has unknown keys {unknown}; allowed: {', '.join(KINDS)}")
        given["structured_outputs"] = request.structured_outputs
    for kind in GUIDED:
        value = getattr(request, f"guided_{kind}")
        if value is not None:
            given[f"guided_{kind}"] = {kind: value}
    response_format = response_format_constraint(getattr(request, "response_format", None))
    if response_format is not None:
        given["response_format"] = response_format
    if len(given) > 1:
        raise ValueError(f"{', '.join(given)} each constrain the output; set only one of them")
    if not given:
        return None
    source, spec = given.popitem()
    try:
        return StructuredOutputsParams(**spec)
    except ValueError as exc:
        raise ValueError(rename(str(exc), source)) from None


def response_format_constraint(response_format: dict | None) -> dict | None:
    """StructuredOutputsParams keywords for OpenAI's response_format (None for text)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise ValueError(f"response_format.type must be one of {', '.join(RESPONSE_FORMATS)}, got {kind!r}")
    unknown = sorted(set(response_format) - RESPONSE_FORMATS[kind])
    if unknown:
        raise ValueError(f"response_format of type {kind!r} has unknown keys {unknown}; allowed: "
                         f"{', '.join(sorted(RESPONSE_FORMATS[kind]))}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("response_format.json_schema must be an object with name and schema (and optionally "
                         f"strict, description), got {spec!r}")
    unknown = sorted(set(spec) - JSON_SCHEMA_KEYS)
    if unknown:
        raise ValueError(f"response_format.json_schema has unknown keys {unknown}; allowed: "
                         f"{', '.join(sorted(JSON_SCHEMA_KEYS))}")
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.fullmatch(name):
        raise ValueError(f"response_format.json_schema.name must be 1 to 64 letters, digits, _ or -, got {name!r}")
    if not isinstance(spec.get("strict", False), bool):
        raise ValueError(f"response_format.json_schema.strict must be true or false, got {spec['strict']!r}")
    if "schema" not in spec:
        raise ValueError("response_format.json_schema.schema is required: the JSON schema the output must follow")
    return {"json": parse_json_schema(spec["schema"], "response_format.json_schema.schema")}


def constraint_field(request: Any) -> str:
    """The request field that sets its constraint: one of the constraint fields, else tools (the constraint of
    tool_choice required or a named function)."""
    names = ("structured_outputs", *(f"guided_{kind}" for kind in GUIDED), "response_format")
    return next((name for name in names if getattr(request, name, None) not in (None, {"type": "text"})), "tools")


def rename(message: str, source: str) -> str:
    """A StructuredOutputsParams error as the client spelled the field: guided_regex, response_format.*, ..."""
    match = re.match(r"structured_outputs\.(\w+)", message)
    if match is None or source == "structured_outputs":
        return message
    kind = match.group(1)
    field = {"response_format": "response_format.json_schema.schema" if kind == "json" else "response_format",
             "tools": "tools"}.get(source, f"guided_{kind}")
    return field + message[match.end():]
