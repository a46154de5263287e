"""The served OpenAPI schema, true to the server: the bodies it parses, the replies it sends, its error codes."""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from kvserve.core.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                      EmbeddingRequest, LoadLoRAAdapterRequest, TokenizeRequest,
                                                      UnloadLoRAAdapterRequest)

REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, EmbeddingRequest, TokenizeRequest, DetokenizeRequest,
                  LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: dict[str, str]   # name, and arguments as JSON text


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str   # floats, or with encoding_format base64 their little-endian float32 bytes


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    root: str           # the base model's served name, or a LoRA adapter's folder
    parent: str | None  # a LoRA adapter's base model


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Tokens(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class Text(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok"]
    failed_steps: int
    last_error: str | None


class Version(BaseModel):
    version: str


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


NOT_READY = {503: _error("the engine is loading, failed to start, or has stopped")}
UNAUTHORIZED = {401: _error("missing or wrong API key, when the server has one")}
REQUEST_ERRORS = {400: _error("the request is invalid: the message names the field and the allowed values"),
                  404: _error("the model is not served"),
                  413: _error("the body is larger than --max-request-bytes"),
                  500: _error("an engine step failed"), **UNAUTHORIZED, **NOT_READY}
_LORA_ERRORS = {413: REQUEST_ERRORS[413], **UNAUTHORIZED, **NOT_READY}
LORA_LOAD_ERRORS = {400: _error("LoRA is off (--enable-lora), the name is served already, or the adapter is "
                                "missing or does not fit the model"), **_LORA_ERRORS}
LORA_UNLOAD_ERRORS = {400: _error("LoRA is off (--enable-lora), or the body is invalid"),
                      404: _error("no adapter of that name is loaded"), **_LORA_ERRORS}
# Before OpenAPI 3.2, an event stream's schema is each event's: its data is a chunk's JSON, or [DONE] at the end.
EVENT_STREAM = {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                 "properties": {"data": {"type": "string"}}}}}


def documented(request: type[BaseModel] | None, reply: type[BaseModel], errors: dict | None = None,
               streams: bool = False) -> dict:
    """Route arguments that document an endpoint: its body, which the server parses itself (off its event loop,
    so no route parameter declares it), its reply, as server-sent events too where it streams, and its errors
    (by default those of a request to the engine)."""
    ok: dict[str, Any] = {"model": reply}
    if streams:
        ok.update(content=EVENT_STREAM, description="the reply, or with stream: true, server-sent events")
    arguments: dict[str, Any] = {"responses": {200: ok, **(REQUEST_ERRORS if errors is None else errors)}}
    if request is not None:
        content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{request.__name__}"}}}
        arguments["openapi_extra"] = {"requestBody": {"required": True, "content": content}}
    return arguments


def documented_text(request: type[BaseModel], errors: dict) -> dict:
    """Route arguments that document an endpoint whose reply is plain text."""
    arguments = documented(request, Text, errors)
    arguments["responses"][200] = {"description": "what was done",
                                   "content": {"text/plain": {"schema": {"type": "string"}}}}
    return arguments


def install(app: FastAPI, model_names: list[str]) -> None:
    """Serve a schema that also holds the request bodies, which no route parameter declares, with the served
    model names as the values ``model`` may take."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                         ref_template="#/components/schemas/{model}")
            for model in REQUEST_MODELS:
                if "model" in model.model_fields:
                    defs["$defs"][model.__name__]["properties"]["model"]["anyOf"][0]["enum"] = model_names
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
