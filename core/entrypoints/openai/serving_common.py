"""What completions and chat share: model check, parameter and length validation, streaming helpers."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Callable

from kvserve.core.engine.async_engine import AsyncLLMEngine
from kvserve.core.entrypoints.openai.constraints import constraint_field, rename
from kvserve.core.entrypoints.openai.errors import APIError, bad_request, unsupported
from kvserve.core.entrypoints.openai.limits import Offload, ServerLimits
from kvserve.core.entrypoints.openai.metrics import RequestTimer, ServerMetrics
from kvserve.core.entrypoints.openai.protocol import SamplingFields
from kvserve.core.entrypoints.openai.serving_models import ServedModels
from kvserve.core.lora.request import LoRARequest
from kvserve.core.outputs import RequestOutput
from kvserve.core.sampling_params import BeamSearchParams, SamplingParams

_DONE = object()


class OpenAIServing:
    """A request's checks and preparation run in ``offload``'s worker threads (they may tokenize or render a long
    prompt); only awaiting the engine runs on the event loop."""

    def __init__(self, engine: AsyncLLMEngine, models: ServedModels, metrics: ServerMetrics,
                 limits: ServerLimits, offload: Offload):
        self.engine = engine
        self.inputs = engine.inputs
        self.models = models
        self.metrics = metrics
        self.limits, self.offload = limits, offload

    def model_name(self, requested: str | None) -> str:
        return self.models.resolve(requested)

    def sampling_params(self, request: SamplingFields, prompt_len: int, max_tokens: int | None,
                        explicit: bool) -> SamplingParams | BeamSearchParams:
        """Validated params; an explicit max_tokens that does not fit the context is an error, a default is capped."""
        names = request.unsupported()
        if names:
            raise unsupported(names)
        limit = self.inputs.max_model_len
        room = limit - prompt_len
        if max_tokens is not None and max_tokens > room and explicit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                                "completion). Reduce the prompt or max_tokens.", "max_tokens")
        defaults = self.inputs.sampling_defaults
        max_tokens = min(defaults.get("max_tokens", room) if max_tokens is None else max_tokens, room)
        try:
            params = request.sampling_params(max_tokens, defaults)
            self.inputs.check_params(params)
        except (ValueError, TypeError) as exc:
            raise bad_request(exc, set(type(request).model_fields)) from exc
        return params

    def check_request_tokens(self, prompt_lens: list[int], params: list[SamplingParams | BeamSearchParams]) -> None:
        """The request's tokens at its fullest: each sample of each prompt holds its prompt and max_tokens."""
        self.limits.check_tokens(sum(
            (p.beam_width if isinstance(p, BeamSearchParams) else p.num_samples) * (length + p.max_tokens)
            for length, p in zip(prompt_lens, params)))

    async def check_constraint(self, request: SamplingFields, params: SamplingParams | BeamSearchParams) -> None:
        """Compile the request's output constraint on a worker thread, so that a slow one stalls neither the event
        loop nor the engine; a 400 naming the field if it cannot be compiled."""
        try:
            await asyncio.to_thread(self.inputs.check_constraint, params)
        except ValueError as exc:
            message = rename(str(exc), constraint_field(request))
            raise bad_request(ValueError(message), set(type(request).model_fields)) from exc

    def decode_token(self, token_id: int) -> str:
        return self.inputs.tokenizer.decode([token_id])

    def tokenize(self, prompt: str | list[int], field: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            self.limits.check_chars(prompt, field)
        try:
            return self.inputs.tokenize(prompt)
        except (ValueError, TypeError) as exc:
            raise APIError(400, str(exc), field) from exc

    async def run(self, request_id: str, prompts: list[str | list[int]], token_ids: list[list[int]],
                  params: list[SamplingParams | BeamSearchParams],
                  lora_request: LoRARequest | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run several engine requests at once, with the LoRA adapter ``lora_request`` names if any; yields
        (prompt index, output) as outputs arrive."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            timer = RequestTimer(self.metrics)
            try:
                async for output in self.engine.generate(f"{request_id}-{i}", prompts[i], params[i], token_ids[i],
                                                         lora_request):
                    timer.on_output(output)
                    merged.put_nowait((i, output))
            except Exception as exc:
                merged.put_nowait((i, exc))
            finally:
                merged.put_nowait((i, _DONE))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await merged.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:   # a disconnect or an error: abort whatever still runs
                task.cancel()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def wants_usage(request: SamplingFields) -> bool:
    return request.stream_options is not None and request.stream_options.include_usage


async def sse_stream(events: AsyncIterator[str], usage_chunk: Callable[[], dict | None]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI ends them: the usage chunk if asked for, then [DONE]; a failure
    mid-stream becomes an error event, since the status line has already gone out."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield sse(exc.body())
    except Exception as exc:
        yield sse(APIError(500, f"generation failed: {exc}").body())
    else:
        final = usage_chunk()
        if final is not None:
            yield sse(final)
    yield sse("[DONE]")


class DeltaTracker:
    """Turns cumulative completion texts into the new text of each choice, once each. A step that adds tokens
    but no text yet (the first bytes of a multi-byte character) still counts as a change, as in vLLM, so that
    clients see every token arrive (time to first token, inter-token latency, its logprobs)."""

    def __init__(self):
        self.sent: dict[int, tuple[int, int]] = {}   # choice -> (characters, tokens) already sent
        self.finished: set[int] = set()

    def delta(self, choice: int, text: str, num_tokens: int, finished: bool) -> tuple[str, bool] | None:
        """(new text, finishes now), or None when this choice has no new token and is not finishing."""
        chars, tokens = self.sent.get(choice, (0, 0))
        new = text[chars:]
        finishing = finished and choice not in self.finished
        if not new and num_tokens == tokens and not finishing:
            return None
        self.sent[choice] = (len(text), num_tokens)
        if finishing:
            self.finished.add(choice)
        return new, finishing
