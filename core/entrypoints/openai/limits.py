"""What one request may ask of the server, and the worker pool that keeps its CPU work off the event loop."""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

from kvserve.core.options import check_int, option
from kvserve.core.entrypoints.openai.errors import APIError

T = TypeVar("T")
CHARS_PER_TOKEN = 32   # generous: English runs near 4 characters a token; no tokenizer packs 32 into one


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on a single request, each refused with an error that names its option. The token bounds default
    to what the engine can hold: max_prompt_chars to 32 characters per token of max_model_len, and
    max_request_tokens to max_num_seqs sequences of max_model_len tokens."""

    max_request_bytes: int = option(2 * 1024 * 1024, "largest request body in bytes; a larger one is refused with "
                                                     "413 before it is parsed")
    max_prompts_per_request: int = option(256, "most prompts one completions request may send")
    max_prompt_chars: int | None = option(None, "most characters in one prompt (a chat's rendered prompt), checked "
                                                f"before tokenization (default: {CHARS_PER_TOKEN} x max_model_len)")
    max_request_tokens: int | None = option(None, "most tokens one request may hold at once, summed over its prompts "
                                                  "and samples: prompt tokens plus max_tokens, for each of n (or "
                                                  "best_of, or the beams) (default: max_num_seqs x max_model_len)")
    trust_request_chat_template: bool = option(False, "accept a chat_template in requests; it runs the sender's "
                                                      "Jinja on the server, so it is refused by default")

    def __post_init__(self):
        check_int("max_request_bytes", self.max_request_bytes, 1)
        check_int("max_prompts_per_request", self.max_prompts_per_request, 1)
        check_int("max_prompt_chars", self.max_prompt_chars, 1, allow_none=True)
        check_int("max_request_tokens", self.max_request_tokens, 1, allow_none=True)

    def for_engine(self, max_model_len: int, max_num_seqs: int) -> ServerLimits:
        """These limits with the token bounds' defaults filled in from the engine's."""
        return replace(self, max_prompt_chars=self.max_prompt_chars or CHARS_PER_TOKEN * max_model_len,
                       max_request_tokens=self.max_request_tokens or max_num_seqs * max_model_len)

    def check_prompt_count(self, count: int) -> None:
        if count > self.max_prompts_per_request:
            raise APIError(400, f"the request has {count} prompts; at most {self.max_prompts_per_request} are "
                                "allowed (--max-prompts-per-request)", "prompt")

    def check_chars(self, text: str, param: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {len(text)} characters; at most {self.max_prompt_chars} are "
                                "allowed before tokenization (--max-prompt-chars)", param)

    def check_tokens(self, tokens: int) -> None:
        if tokens > self.max_request_tokens:
            raise APIError(400, f"the request would hold {tokens} tokens (prompt plus max_tokens, for each prompt "
                                f"and sample); at most {self.max_request_tokens} are allowed (--max-request-tokens); "
                                "lower max_tokens, n or the number of prompts", "max_tokens")


class Offload:
    """A bounded pool of worker threads for a request's CPU work (parsing its body, rendering its chat template,
    tokenizing, serializing a reply), so that the event loop keeps answering other requests meanwhile."""

    def __init__(self, workers: int = 4):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="kvserve-request")

    async def __call__(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused with 413 before anything parses it. The body
    is read to its end and dropped, never held, so that the client sees the answer rather than a reset."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        chunks, size, more = [], 0, not declared.isdigit() or int(declared) > 0
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            too_large = too_large or size > self.max_bytes
            if not too_large:
                chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        if too_large:
            error = APIError(413, f"the request body has more than {self.max_bytes} bytes; at most "
                                  f"{self.max_bytes} are allowed (--max-request-bytes)")
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": json.dumps(error.body()).encode()})
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
