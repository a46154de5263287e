"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import re

from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 413: "RequestTooLargeError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "Error"),
                          "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(exc: Exception, fields: set[str] | frozenset[str] = frozenset()) -> APIError:
    """A 400 from a ValueError/TypeError; ``param`` is the request field the message starts with, if any."""
    message = str(exc)
    match = re.match(r"[A-Za-z_]+", message)
    return APIError(400, message, match.group(0) if match and match.group(0) in fields else None)


def invalid_body(errors: list[dict]) -> APIError:
    """A 400 from pydantic's errors on a request body, naming the field. Where the field may take several types
    (a union), pydantic reports one error per type: the one that got furthest into the value is the meaningful
    one, and if none did, the message lists what the field may be."""
    first = (errors or [{}])[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    path = _path(first.get("loc", ()))
    branches = [e for e in errors if _path(e["loc"])[:len(path)] == path]
    deepest = max(branches, key=lambda e: len(e["loc"]))
    message = deepest["msg"]
    if all(len(e["loc"]) == len(deepest["loc"]) for e in branches):
        kinds = dict.fromkeys(e["msg"].removeprefix("Input should be ") for e in branches)
        message = "Input should be " + " or ".join(kinds) if len(kinds) > 1 else message
    fields = [str(p) for p in _path(deepest["loc"])]
    param = next((p for p in fields if not p.isdigit()), None)
    return APIError(400, f"{'.'.join(fields) or 'body'}: {message}", param)


def _path(loc: tuple) -> tuple:
    """The fields and indexes of an error's location, without pydantic's union member tags ('str', 'list[int]',
    'constrained-int', a model's class name), which name types, not fields."""
    return tuple(p for p in loc if p != "body" and not (
        isinstance(p, str) and (p in ("str", "int", "float", "bool") or p[:1].isupper() or set(p) & set("[]-'"))))


def unsupported(names: list[str]) -> APIError:
    return APIError(400, f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} not supported by this server "
                         "yet; remove the parameter", names[0])
