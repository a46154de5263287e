"""A request's output constraint, named as vLLM names it, checked when it is made."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

import jsonschema

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint the output must follow: ``json`` (a JSON schema, as a dict or its text),
    ``regex``, ``choice`` (the output is one of these strings), ``grammar`` (EBNF / GBNF text) or
    ``json_object=True`` (any JSON object). A schema or regex that the backend cannot compile is a ValueError
    when the request is checked, before it starts."""

    json: dict | str | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self):
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        if self.json is not None:
            object.__setattr__(self, "json", parse_json_schema(self.json, "structured_outputs.json"))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice or any(
                not isinstance(c, str) for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be true, got {self.json_object!r}")

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as text: what is compiled, what the cache is keyed by, and what the size limit counts."""
        value = getattr(self, self.kind)
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parse_json_schema(schema: Any, field: str) -> dict | bool:
    """A JSON schema from a dict, a boolean or JSON text, checked against its metaschema; a ValueError naming
    ``field`` and the first problem otherwise."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{field} is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{field} must be a JSON schema (an object), got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(map(str, exc.path))
        raise ValueError(f"{field} is not a valid JSON schema: {exc.message}"
                         + (f" (at {where})" if where else "")) from None
    return schema
