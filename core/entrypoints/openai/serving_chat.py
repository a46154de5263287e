"""POST /v1/chat/completions."""
from __future__ import annotations

from typing import AsyncIterator

from kvserve.core.entrypoints.openai.errors import APIError
from kvserve.core.entrypoints.openai.logprobs import chat_logprobs
from kvserve.core.entrypoints.openai.protocol import ChatCompletionRequest
from kvserve.core.entrypoints.openai.serving_common import (DeltaTracker, OpenAIServing, new_id, now, sse, sse_stream,
                                                            usage, wants_usage)
from kvserve.core.outputs import CompletionOutput


class OpenAIServingChat(OpenAIServing):
    def render(self, request: ChatCompletionRequest) -> list[int]:
        try:
            ids = self.inputs.render_chat(request.conversation(), request.chat_template,
                                          request.add_generation_prompt)
        except (ValueError, TypeError) as exc:
            raise APIError(400, str(exc), "messages") from exc
        return self.tokenize(ids, "messages")

    async def create(self, request: ChatCompletionRequest) -> dict | AsyncIterator[str]:
        model = self.model_name(request.model)
        ids = self.render(request)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None \
            else request.max_tokens
        params = self.sampling_params(request, len(ids), max_tokens, explicit=max_tokens is not None)
        request_id = new_id("chatcmpl")
        outputs = self.run(request_id, [ids], [ids], [params])
        if request.stream:
            return self._stream(request, model, request_id, outputs, len(ids))
        final = None
        async for _, output in outputs:
            final = output
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._logprobs(request, c), "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for c in final.outputs]
        generated = sum(len(c.token_ids) for c in final.outputs)
        return {"id": request_id, "object": "chat.completion", "created": now(), "model": model,
                "choices": choices, "usage": usage(len(ids), generated)}

    def _stream(self, request: ChatCompletionRequest, model: str, request_id: str, outputs,
                prompt_tokens: int) -> AsyncIterator[str]:
        include_usage = wants_usage(request)
        base = {"id": request_id, "object": "chat.completion.chunk", "created": now(), "model": model}
        tracker, generated = DeltaTracker(), {}

        def chunk(index: int, delta: dict, finish_reason=None, logprobs=None) -> str:
            body = {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]}
            return sse({**body, "usage": None} if include_usage else body)

        async def events() -> AsyncIterator[str]:
            for index in range(request.n):
                yield chunk(index, {"role": "assistant", "content": ""})
            async for _, output in outputs:
                for c in output.outputs:
                    change = tracker.delta(c.index, c.text, len(c.token_ids), c.finish_reason is not None)
                    if change is None:
                        continue
                    text, finishing = change
                    logprobs = self._logprobs(request, c, generated.get(c.index, 0))
                    generated[c.index] = len(c.token_ids)
                    if text or not finishing:   # a token without text yet still gets its chunk
                        yield chunk(c.index, {"content": text}, logprobs=logprobs)
                        logprobs = None
                    if finishing:
                        yield chunk(c.index, {}, c.finish_reason, logprobs)

        def usage_chunk() -> dict | None:
            if not include_usage:
                return None
            return {**base, "choices": [], "usage": usage(prompt_tokens, sum(generated.values()))}

        return sse_stream(events(), usage_chunk)

    @staticmethod
    def _logprobs(request: ChatCompletionRequest, completion: CompletionOutput, sent: int = 0) -> dict | None:
        """Logprobs of the tokens after the first ``sent``; None when not asked for or none are new."""
        if not request.logprobs or len(completion.token_ids) <= sent:
            return None
        return chat_logprobs(completion.token_ids[sent:], completion.logprobs[sent:], request.top_logprobs or 0)
