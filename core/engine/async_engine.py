"""Drives an LLMEngine on a background thread so that an asyncio server can stream many requests at once."""
from __future__ import annotations

import asyncio
import copy
import queue
import threading
from typing import Any, AsyncIterator, Callable

from kvserve.core.engine.input_processor import InputProcessor
from kvserve.core.engine.llm_engine import EngineStepError, LLMEngine
from kvserve.core.log import logger
from kvserve.core.lora.request import LoRARequest
from kvserve.core.outputs import RequestOutput
from kvserve.core.sampling_params import BeamSearchParams, SamplingParams

class EngineDeadError(RuntimeError):
    """The engine loop stopped on an unexpected error; no request can run any more."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        # The server tokenizes on its own threads, with its own copy, apart from the engine thread that detokenizes.
        self.inputs = InputProcessor(copy.deepcopy(engine.tokenizer), engine.runner.vocab_size, engine.max_model_len,
                                     engine.config.scheduler.max_num_seqs, engine.grammars,
                                     engine.config.model.chat_template, engine.inputs.sampling_defaults,
                                     engine.inputs.pooling)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.dead_error: BaseException | None = None
        self.failed_steps = 0
        self.last_error: EngineStepError | None = None
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()

    @property
    def stopped_because(self) -> BaseException | None:
        """Why the engine serves nothing more, if it does not: its loop died, or a rank's process ended."""
        return self.dead_error or self.engine.failure

    @property
    def is_healthy(self) -> bool:
        return self.stopped_because is None and self._thread.is_alive()

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams | BeamSearchParams,
                       prompt_token_ids: list[int],
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iteration early (a disconnect) aborts the request."""
        if not self.is_healthy:
            raise EngineDeadError(f"the engine has stopped: {self.stopped_because}")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send("add", request_id, prompt, params, prompt_token_ids, lora_request)
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    async def on_engine_thread(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """``fn(engine)``, run on the engine's thread between steps (the engine's state is that thread's)."""
        if not self.is_healthy:
            raise EngineDeadError(f"the engine has stopped: {self.stopped_because}")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._send("call", None, fn, loop, done)
        return await done

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def _send(self, *command) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:   # the server's loop has closed
                pass

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, request_id, *args = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                self.engine.abort_request(request_id)
                continue
            if kind == "call":
                self._call(*args)
                continue
            prompt, params, prompt_token_ids, lora_request = args
            try:
                self.engine.add_request(request_id, prompt, params, prompt_token_ids, lora_request)
            except (ValueError, TypeError) as exc:
                self._deliver(request_id, exc)

    def _call(self, fn: Callable[[LLMEngine], Any], loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        try:
            settle, outcome = done.set_result, fn(self.engine)
        except Exception as exc:
            settle, outcome = done.set_exception, exc
        try:
            loop.call_soon_threadsafe(_settle, done, settle, outcome)
        except RuntimeError:   # the server's loop has closed
            pass

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait()
                    continue
                try:
                    outputs = self.engine.step()
                except EngineStepError as exc:
                    self.failed_steps += 1
                    self.last_error = exc
                    logger.exception("model step failed; failing requests %s", exc.request_ids)
                    for request_id in exc.request_ids:
                        self._deliver(request_id, exc)
                    continue
                for output in outputs:
                    self._deliver(output.request_id, output)
        except BaseException as exc:  # anything else leaves the engine in an unknown state: stop it
            logger.exception("the engine loop died")
            self.dead_error = exc
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"the engine has stopped: {exc}"))


def _settle(future: asyncio.Future, settle: Callable[[Any], None], outcome: Any) -> None:
    if not future.cancelled():   # the client went away meanwhile
        settle(outcome)
