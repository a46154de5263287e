"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import re

from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


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


def unsupported(names: list[str]) -> APIError:
    return APIError(400, f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} not supported by this server "
                         "yet; remove the parameter", names[0])
