"""The model names the server answers to: the base model's, and with --enable-lora each LoRA adapter's, which
clients pick by the request's ``model``; and the routes that load and unload adapters at run time."""
from __future__ import annotations

from itertools import count
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from kvserve.core.entrypoints.openai import openapi
from kvserve.core.entrypoints.openai.errors import APIError
from kvserve.core.entrypoints.openai.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from kvserve.core.lora.request import LoRARequest


class ServedModels:
    def __init__(self, base_names: list[str], enable_lora: bool):
        self.base_names, self.enable_lora = base_names, enable_lora
        self.adapters: dict[str, LoRARequest] = {}
        self.loading: set[str] = set()
        self._ids = count(1)   # never reused: an adapter's prefix-cache blocks are keyed by its id

    @property
    def names(self) -> list[str]:
        return self.base_names + list(self.adapters)

    def resolve(self, requested: str | None) -> str:
        """The served name a request asks for (the base model's first by default); 404 for another."""
        if requested is not None and requested not in self.names:
            raise APIError(404, f"The model `{requested}` does not exist; served: {', '.join(self.names)}", "model")
        return requested or self.base_names[0]

    def lora(self, name: str) -> LoRARequest | None:
        """The adapter a served name stands for; None for the base model."""
        return self.adapters.get(name)

    def reserve(self, name: str, path: str) -> LoRARequest:
        """A new adapter's request, its name held until ``add`` or ``release``."""
        self._check_enabled()
        if name in self.names or name in self.loading:
            raise APIError(400, f"a model named {name!r} is served already; unload it first or choose another "
                                f"lora_name", "lora_name")
        self.loading.add(name)
        return LoRARequest(name, next(self._ids), path)

    def add(self, request: LoRARequest) -> None:
        self.loading.discard(request.lora_name)
        self.adapters[request.lora_name] = request

    def release(self, request: LoRARequest) -> None:
        self.loading.discard(request.lora_name)

    def remove(self, name: str) -> LoRARequest:
        self._check_enabled()
        if name not in self.adapters:
            raise APIError(404, f"no LoRA adapter named {name!r} is loaded; loaded: "
                                f"{', '.join(self.adapters) or 'none'}", "lora_name")
        return self.adapters.pop(name)

    def cards(self, created: int, max_model_len: int) -> list[dict]:
        """/v1/models' entries: an adapter's names its base model (parent) and its folder (root)."""
        base = [{"id": name, "object": "model", "created": created, "owned_by": "kvserve",
                 "max_model_len": max_model_len, "root": name, "parent": None} for name in self.base_names]
        return base + [{"id": name, "object": "model", "created": created, "owned_by": "kvserve",
                        "max_model_len": max_model_len, "root": lora.lora_path, "parent": self.base_names[0]}
                       for name, lora in self.adapters.items()]

    def _check_enabled(self) -> None:
        if not self.enable_lora:
            raise APIError(400, "LoRA adapters need a server started with --enable-lora", "lora_name")


def install_lora_routes(app: FastAPI, models: ServedModels, parse: Callable[[Request, type], Awaitable],
                        on_engine: Callable[[Callable], Awaitable]) -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter, as vLLM's (plain-text replies). ``on_engine(fn)``
    runs ``fn(engine)`` on the engine's thread, between steps."""

    @app.post("/v1/load_lora_adapter",
              **openapi.documented_text(LoadLoRAAdapterRequest, openapi.LORA_LOAD_ERRORS))
    async def load_lora_adapter(request: Request):
        body = await parse(request, LoadLoRAAdapterRequest)
        lora = models.reserve(body.lora_name, body.lora_path)
        try:
            await on_engine(lambda engine: engine.check_lora(lora))
        except ValueError as exc:
            raise APIError(400, str(exc), "lora_path") from exc
        finally:
            models.release(lora)
        models.add(lora)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter",
              **openapi.documented_text(UnloadLoRAAdapterRequest, openapi.LORA_UNLOAD_ERRORS))
    async def unload_lora_adapter(request: Request):
        body = await parse(request, UnloadLoRAAdapterRequest)
        lora = models.remove(body.lora_name)
        await on_engine(lambda engine: engine.remove_lora(lora.lora_int_id))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
