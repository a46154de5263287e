"""The OpenAI-compatible HTTP server: a FastAPI app over the async engine, run by uvicorn."""
from __future__ import annotations

import asyncio
import hmac
import json
import signal
import threading
import time
from typing import Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import kvserve
from kvserve.core.config import EngineConfig
from kvserve.core.engine.async_engine import AsyncLLMEngine, EngineDeadError
from kvserve.core.engine.data_parallel import make_engine
from kvserve.core.engine.llm_engine import EngineStepError
from kvserve.core.entrypoints.openai import openapi
from kvserve.core.entrypoints.openai.errors import APIError, invalid_body
from kvserve.core.entrypoints.openai.limits import BodyLimit, Offload, ServerLimits
from kvserve.core.entrypoints.openai.metrics import ServerMetrics
from kvserve.core.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                      EmbeddingRequest, TokenizeRequest)
from kvserve.core.entrypoints.openai.serving_chat import OpenAIServingChat
from kvserve.core.entrypoints.openai.tools import ReplyParsers
from kvserve.core.entrypoints.openai.serving_completion import OpenAIServingCompletion
from kvserve.core.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from kvserve.core.entrypoints.openai.serving_models import ServedModels, install_lora_routes
from kvserve.core.log import logger

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
Body = TypeVar("Body", bound=BaseModel)


class ServerState:
    """The engine, loaded on a background thread so that /health answers 503 while it loads."""

    def __init__(self, config: EngineConfig, served_model_names: list[str], api_key: str | None,
                 parsers: ReplyParsers = ReplyParsers(), limits: ServerLimits = ServerLimits(),
                 lora_modules: dict[str, str] | None = None):
        """``lora_modules``: {name: folder} of the LoRA adapters served from the start."""
        self.config, self.parsers, self.limits, self.offload = config, parsers, limits, Offload()
        self.model_names = served_model_names
        self.models = ServedModels(served_model_names, config.lora.enable_lora)
        self.lora_modules = lora_modules or {}
        self.api_key = api_key
        self.engine: AsyncLLMEngine | None = None
        self.load_error: BaseException | None = None
        self.on_load_failure = lambda: None
        self.metrics = ServerMetrics(lambda: self.engine, served_model_names[0])
        self.created = int(time.time())

    def load(self) -> None:
        try:
            engine = make_engine(self.config)
            for name, path in self.lora_modules.items():   # checked before anything is served
                lora = self.models.reserve(name, path)
                engine.check_lora(lora)
                self.models.add(lora)
            engine = AsyncLLMEngine(engine)
        except BaseException as exc:
            logger.error("could not start the engine: %s", exc)
            self.load_error = exc
            self.on_load_failure()
            return
        limits = self.limits.for_engine(engine.inputs.max_model_len, engine.inputs.max_num_seqs)
        serving = (engine, self.models, self.metrics, limits, self.offload)
        self.completion = OpenAIServingCompletion(*serving)
        self.chat = OpenAIServingChat(*serving, parsers=self.parsers)
        self.embedding = OpenAIServingEmbedding(*serving)
        self.engine = engine
        logger.info("engine ready; serving %s", ", ".join(self.model_names))

    def ready_engine(self) -> AsyncLLMEngine:
        if self.engine is None:
            raise APIError(503, "the engine is still loading" if self.load_error is None
                           else f"the engine failed to start: {self.load_error}")
        if not self.engine.is_healthy:
            raise APIError(503, f"the engine has stopped: {self.engine.stopped_because}")
        return self.engine

    def check_generates(self) -> None:
        """Completions and chat need a generative model."""
        if self.engine.inputs.pooling is not None:
            raise APIError(400, f"model {self.model_names[0]!r} is an embedding model (runner='pooling'): it "
                                "answers POST /v1/embeddings, not completions or chat")


async def cancel_on_disconnect(request: Request, work: Awaitable):
    """Await ``work`` unless the client goes away first; then cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=499)
    return task.result()


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="kvserve", version=kvserve.__version__)
    app.state.kvserve = state
    openapi.install(app, state.model_names + list(state.lora_modules))

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if state.api_key and request.url.path.startswith(PROTECTED_PREFIXES):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'").response()
        return await call_next(request)

    app.add_middleware(BodyLimit, max_bytes=state.limits.max_request_bytes)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):   # unknown routes and methods, in OpenAI's shape
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError):
        return APIError(503, str(exc)).response()

    @app.exception_handler(EngineStepError)
    async def step_failed(_: Request, exc: EngineStepError):
        return APIError(500, str(exc)).response()

    async def parse(request: Request, model: type[Body]) -> Body:
        """The request's body as ``model``, parsed off the event loop, once the engine is ready for it."""
        state.ready_engine()
        try:
            return await state.offload(model.model_validate_json, await request.body())
        except ValidationError as exc:
            raise invalid_body(exc.errors()) from None

    async def reply(result: dict) -> Response:
        return Response(await state.offload(json_bytes, result), media_type="application/json")

    @app.get("/health", **openapi.documented(None, openapi.Health, openapi.NOT_READY))
    async def health():
        engine = state.ready_engine()
        return {"status": "ok", "failed_steps": engine.failed_steps,
                "last_error": None if engine.last_error is None else str(engine.last_error)}

    @app.get("/version", **openapi.documented(None, openapi.Version, {}))
    async def version():
        return {"version": kvserve.__version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", **openapi.documented(None, openapi.ModelList, openapi.UNAUTHORIZED))
    async def models():
        return {"object": "list", "data": state.models.cards(state.created, state.config.model.max_model_len)}

    async def respond(request: Request, work: Awaitable):
        result = await cancel_on_disconnect(request, work)
        if isinstance(result, Response):
            return result
        if isinstance(result, dict):
            return await reply(result)
        return StreamingResponse(result, media_type="text/event-stream")

    @app.post("/v1/completions", **openapi.documented(CompletionRequest, openapi.Completion, streams=True))
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        state.check_generates()
        return await respond(request, state.completion.create(body))

    @app.post("/v1/chat/completions", **openapi.documented(ChatCompletionRequest, openapi.ChatCompletion,
                                                           streams=True))
    async def chat_completions(request: Request):
        body = await parse(request, ChatCompletionRequest)
        state.check_generates()
        return await respond(request, state.chat.create(body))

    @app.post("/v1/embeddings", **openapi.documented(EmbeddingRequest, openapi.EmbeddingList))
    async def embeddings(request: Request):
        body = await parse(request, EmbeddingRequest)
        return await respond(request, state.embedding.create(body))

    install_lora_routes(app, state.models, parse, lambda fn: state.ready_engine().on_engine_thread(fn))

    @app.post("/tokenize", **openapi.documented(TokenizeRequest, openapi.Tokens))
    async def tokenize(request: Request):
        body = await parse(request, TokenizeRequest)
        return await reply(await state.offload(state.chat.tokenize_request, body))

    @app.post("/detokenize", **openapi.documented(DetokenizeRequest, openapi.Text))
    async def detokenize(request: Request):
        body = await parse(request, DetokenizeRequest)
        return await reply(await state.offload(state.chat.detokenize_request, body))

    return app


def json_bytes(result: dict) -> bytes:
    return json.dumps(result, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def serve(config: EngineConfig, host: str, port: int, served_model_names: list[str], api_key: str | None,
          parsers: ReplyParsers = ReplyParsers(), limits: ServerLimits = ServerLimits(),
          shutdown_timeout: float = 30.0, lora_modules: dict[str, str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; returns the process exit code."""
    import uvicorn

    state = ServerState(config, served_model_names, api_key, parsers, limits, lora_modules)
    server = uvicorn.Server(uvicorn.Config(build_app(state), host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=shutdown_timeout))
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    loader = threading.Thread(target=state.load, name="kvserve-loader", daemon=True)
    loader.start()
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal under the handlers it found;
    # ignoring it here lets the process finish its own shutdown and exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if state.engine is not None:
            state.engine.shutdown()
        state.offload.shutdown()
    return 1 if state.load_error is not None else 0
