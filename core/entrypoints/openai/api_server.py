"""The OpenAI-compatible HTTP server: a FastAPI app over the async engine, run by uvicorn."""
from __future__ import annotations

import asyncio
import hmac
import signal
import threading
import time
from typing import Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

import kvserve
from kvserve.core.config import EngineConfig
from kvserve.core.engine.async_engine import AsyncLLMEngine, EngineDeadError
from kvserve.core.engine.data_parallel import make_engine
from kvserve.core.engine.llm_engine import EngineStepError
from kvserve.core.entrypoints.openai.errors import APIError
from kvserve.core.entrypoints.openai.metrics import ServerMetrics
from kvserve.core.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                      TokenizeRequest)
from kvserve.core.entrypoints.openai.serving_chat import OpenAIServingChat
from kvserve.core.entrypoints.openai.tools import ReplyParsers
from kvserve.core.entrypoints.openai.serving_completion import OpenAIServingCompletion
from kvserve.core.log import logger

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


class ServerState:
    """The engine, loaded on a background thread so that /health answers 503 while it loads."""

    def __init__(self, config: EngineConfig, served_model_names: list[str], api_key: str | None,
                 parsers: ReplyParsers = ReplyParsers()):
        self.config, self.parsers = config, parsers
        self.model_names = served_model_names
        self.api_key = api_key
        self.engine: AsyncLLMEngine | None = None
        self.load_error: BaseException | None = None
        self.on_load_failure = lambda: None
        self.metrics = ServerMetrics(lambda: self.engine)
        self.created = int(time.time())

    def load(self) -> None:
        try:
            engine = AsyncLLMEngine(make_engine(self.config))
        except BaseException as exc:
            logger.error("could not start the engine: %s", exc)
            self.load_error = exc
            self.on_load_failure()
            return
        self.completion = OpenAIServingCompletion(engine, self.model_names, self.metrics)
        self.chat = OpenAIServingChat(engine, self.model_names, self.metrics, parsers=self.parsers)
        self.engine = engine
        logger.info("engine ready; serving %s", ", ".join(self.model_names))

    def ready_engine(self) -> AsyncLLMEngine:
        if self.engine is None:
            raise APIError(503, "the engine is still loading" if self.load_error is None
                           else f"the engine failed to start: {self.load_error}")
        if not self.engine.is_healthy:
            raise APIError(503, f"the engine has stopped: {self.engine.stopped_because}")
        return self.engine


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

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if state.api_key and request.url.path.startswith(PROTECTED_PREFIXES):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'").response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        if first.get("type") == "json_invalid":
            return APIError(400, f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}").response()
        fields = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = next((p for p in fields if not p.isdigit()), None)
        return APIError(400, f"{'.'.join(fields) or 'body'}: {first.get('msg', 'invalid request')}", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):   # unknown routes and methods, in OpenAI's shape
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError):
        return APIError(503, str(exc)).response()

    @app.exception_handler(EngineStepError)
    async def step_failed(_: Request, exc: EngineStepError):
        return APIError(500, str(exc)).response()

    @app.get("/health")
    async def health():
        engine = state.ready_engine()
        return {"status": "ok", "failed_steps": engine.failed_steps,
                "last_error": None if engine.last_error is None else str(engine.last_error)}

    @app.get("/version")
    async def version():
        return {"version": kvserve.__version__}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        limit = state.config.model.max_model_len
        return {"object": "list", "data": [{"id": name, "object": "model", "created": state.created,
                                            "owned_by": "kvserve", "max_model_len": limit}
                                           for name in state.model_names]}

    async def respond(request: Request, work: Awaitable):
        result = await cancel_on_disconnect(request, work)
        if isinstance(result, Response):
            return result
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        state.ready_engine()
        return await respond(request, state.completion.create(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        state.ready_engine()
        return await respond(request, state.chat.create(body))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.ready_engine()
        serving = state.chat
        serving.model_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if body.messages is not None:
            chat = ChatCompletionRequest(messages=body.messages, add_generation_prompt=body.add_generation_prompt)
            tokens = serving.render(chat)
        else:
            tokens = serving.inputs.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": serving.inputs.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.ready_engine()
        serving = state.chat
        serving.model_name(body.model)
        if any(not 0 <= t < serving.inputs.vocab_size for t in body.tokens):
            raise APIError(400, f"tokens must be integers in [0, {serving.inputs.vocab_size})", "tokens")
        return {"prompt": serving.inputs.tokenizer.decode(body.tokens)}

    return app


def serve(config: EngineConfig, host: str, port: int, served_model_names: list[str], api_key: str | None,
          parsers: ReplyParsers = ReplyParsers(), shutdown_timeout: float = 30.0) -> int:
    """Run the server until SIGINT/SIGTERM; returns the process exit code."""
    import uvicorn

    state = ServerState(config, served_model_names, api_key, parsers)
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
    return 1 if state.load_error is not None else 0
