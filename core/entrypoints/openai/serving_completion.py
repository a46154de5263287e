"""POST /v1/completions."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import AsyncIterator

from kvserve.core.entrypoints.openai.errors import APIError
from kvserve.core.entrypoints.openai.logprobs import completion_logprobs
from kvserve.core.entrypoints.openai.protocol import CompletionRequest
from kvserve.core.entrypoints.openai.serving_common import (DeltaTracker, OpenAIServing, new_id, now, sse, sse_stream,
                                                            usage, wants_usage)
from kvserve.core.outputs import CompletionOutput, RequestOutput
from kvserve.core.sampling_params import BeamSearchParams, SamplingParams


async def prompt_only(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs without their generated token, for echo with max_tokens 0: the prompt, and none generated."""
    async for i, output in outputs:
        yield i, replace(output, outputs=[replace(c, text="", token_ids=[], logprobs=c.logprobs and [],
                                                  cumulative_logprob=None, finish_reason=c.finish_reason and "length",
                                                  stop_reason=None) for c in output.outputs])


def split_prompts(prompt, field: str = "prompt") -> list[str | list[int]]:
    """The prompts of a request's ``field``: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, f"{field} is empty; give a string, a list of strings, token ids or lists of token ids",
                       field)
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


@dataclass
class Prepared:
    prompts: list[str | list[int]]
    token_ids: list[list[int]]
    params: list[SamplingParams | BeamSearchParams]
    echoes: list[str]


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest) -> dict | AsyncIterator[str]:
        model = self.model_name(request.model)
        prepared = await self.offload(self.prepare, request)
        await self.check_constraint(request, prepared.params[0])   # the prompts share it
        request_id = new_id("cmpl")
        outputs = self.run(request_id, prepared.prompts, prepared.token_ids, prepared.params,
                           self.models.lora(model))
        if request.max_tokens == 0:
            outputs = prompt_only(outputs)
        token_ids, echoes = prepared.token_ids, prepared.echoes
        if request.stream:
            return self._stream(request, model, request_id, outputs, token_ids, echoes)
        final = {}
        async for i, output in outputs:
            final[i] = output
        choices = [{"index": i * request.n + c.index, "text": echoes[i] + c.text,
                    "logprobs": self._logprobs(request, final[i], c, 0, True)[0],
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                   for i in sorted(final) for c in final[i].outputs]
        generated = sum(len(c.token_ids) for o in final.values() for c in o.outputs)
        return {"id": request_id, "object": "text_completion", "created": now(), "model": model,
                "choices": choices, "usage": usage(sum(map(len, token_ids)), generated)}

    def prepare(self, request: CompletionRequest) -> Prepared:
        """The request's prompts, token ids, parameters and echoed texts, checked against the limits."""
        prompts = split_prompts(request.prompt)
        self.limits.check_prompt_count(len(prompts))
        token_ids = [self.tokenize(p) for p in prompts]
        explicit = "max_tokens" in request.model_fields_set
        max_tokens = request.max_tokens
        if max_tokens == 0:   # prompt scoring: the engine samples one token, which the reply leaves out
            if not request.echo:
                raise APIError(400, "max_tokens: 0 needs echo: true (it scores the prompt); otherwise give "
                                    "max_tokens >= 1", "max_tokens")
            max_tokens = 1
        params = [self.sampling_params(request, len(ids), max_tokens, explicit) for ids in token_ids]
        self.check_request_tokens(list(map(len, token_ids)), params)
        echoes = [self.inputs.tokenizer.decode(ids) if request.echo else "" for ids in token_ids]
        return Prepared(prompts, token_ids, params, echoes)

    def _stream(self, request: CompletionRequest, model: str, request_id: str, outputs,
                token_ids: list[list[int]], echoes: list[str]) -> AsyncIterator[str]:
        include_usage = wants_usage(request)
        base = {"id": request_id, "object": "text_completion", "created": now(), "model": model}
        tracker, generated, offsets = DeltaTracker(), {}, {}

        async def events() -> AsyncIterator[str]:
            async for i, output in outputs:
                for c in output.outputs:
                    choice = i * request.n + c.index
                    change = tracker.delta(choice, c.text, len(c.token_ids), c.finish_reason is not None)
                    if change is None:
                        continue
                    text, finishing = change
                    first = choice not in generated
                    if first:
                        text = echoes[i] + text
                    logprobs, offsets[choice] = self._logprobs(request, output, c, offsets.get(choice, 0), first,
                                                               generated.get(choice, 0))
                    generated[choice] = len(c.token_ids)
                    chunk = {**base, "choices": [{"index": choice, "text": text, "logprobs": logprobs,
                                                  "finish_reason": c.finish_reason if finishing else None,
                                                  "stop_reason": c.stop_reason if finishing else None}]}
                    yield sse({**chunk, "usage": None} if include_usage else chunk)

        def usage_chunk() -> dict | None:
            if not include_usage:
                return None
            return {**base, "choices": [], "usage": usage(sum(map(len, token_ids)), sum(generated.values()))}

        return sse_stream(events(), usage_chunk)

    def _logprobs(self, request: CompletionRequest, output: RequestOutput, completion: CompletionOutput,
                  text_offset: int, with_prompt: bool, sent: int = 0) -> tuple[dict | None, int]:
        """Logprobs of the tokens after the first ``sent`` generated ones (and of the echoed prompt, if asked)."""
        if request.logprobs is None:
            return None, text_offset
        ids, entries = completion.token_ids[sent:], completion.logprobs[sent:]
        if request.echo and with_prompt:
            ids, entries = output.prompt_token_ids + ids, output.prompt_logprobs + entries
        return completion_logprobs(ids, entries, self.decode_token, text_offset)
