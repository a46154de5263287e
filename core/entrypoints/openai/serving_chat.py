"""POST /v1/chat/completions."""
from __future__ import annotations

from dataclasses import replace
from typing import AsyncIterator

from kvserve.core.entrypoints.openai.constraints import constraint_field
from kvserve.core.entrypoints.openai.errors import APIError, bad_request
from kvserve.core.entrypoints.openai.logprobs import chat_logprobs
from kvserve.core.entrypoints.openai.protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from kvserve.core.entrypoints.openai.serving_common import (DeltaTracker, OpenAIServing, new_id, now, sse, sse_stream,
                                                            usage, wants_usage)
from kvserve.core.entrypoints.openai.tools import ReplyParsers, ReplyReader, ToolPlan, plan_tools
from kvserve.core.outputs import CompletionOutput
from kvserve.core.sampling_params import SamplingParams


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args, parsers: ReplyParsers = ReplyParsers()):
        super().__init__(*args)
        self.parsers = parsers

    def render(self, request: ChatCompletionRequest) -> list[int]:
        if request.chat_template is not None and not self.limits.trust_request_chat_template:
            raise APIError(400, "chat_template in a request runs the sender's template code on the server, so this "
                                "server refuses it; remove it, or start the server with "
                                "--trust-request-chat-template (or give the template with --chat-template)",
                           "chat_template")
        try:
            text = self.inputs.chat_text(request.conversation(), request.chat_template,
                                         request.add_generation_prompt, request.tools or None)
        except (ValueError, TypeError) as exc:
            raise APIError(400, str(exc), "messages") from exc
        self.limits.check_chars(text, "messages")
        return self.tokenize(self.inputs.chat_ids(text), "messages")

    def tokenize_request(self, request: TokenizeRequest) -> dict:
        self.model_name(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if request.messages is not None:
            tokens = self.render(ChatCompletionRequest(messages=request.messages,
                                                       add_generation_prompt=request.add_generation_prompt))
        else:
            self.limits.check_chars(request.prompt, "prompt")
            tokens = self.inputs.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.inputs.max_model_len}

    def detokenize_request(self, request: DetokenizeRequest) -> dict:
        self.model_name(request.model)
        if any(not 0 <= t < self.inputs.vocab_size for t in request.tokens):
            raise APIError(400, f"tokens must be integers in [0, {self.inputs.vocab_size})", "tokens")
        return {"prompt": self.inputs.tokenizer.decode(request.tokens)}

    def tool_plan(self, request: ChatCompletionRequest) -> ToolPlan | None:
        try:
            plan = plan_tools(request.tools, request.tool_choice, request.parallel_tool_calls, self.parsers.tool)
            if plan is not None and plan.mode != "none" and constraint_field(request) != "tools":
                raise ValueError(f"{constraint_field(request)} cannot be combined with tools unless tool_choice is "
                                 "'none': tool calls have a format of their own")
            if plan is not None and plan.constraint is not None and request.use_beam_search:
                raise ValueError("tool_choice 'required' or a named function cannot be used with use_beam_search")
        except ValueError as exc:
            raise bad_request(exc, set(type(request).model_fields)) from exc
        return plan

    def reader(self, plan: ToolPlan | None) -> ReplyReader:
        tokenizer = self.inputs.tokenizer
        return ReplyReader(plan, self.parsers.tool(tokenizer) if self.parsers.tool else None,
                           self.parsers.reasoning(tokenizer) if self.parsers.reasoning else None)

    async def create(self, request: ChatCompletionRequest) -> dict | AsyncIterator[str]:
        model = self.model_name(request.model)
        plan, ids, params = await self.offload(self.prepare, request)
        await self.check_constraint(request, params)
        request_id = new_id("chatcmpl")
        outputs = self.run(request_id, [ids], [ids], [params], self.models.lora(model))
        if request.stream:
            return self._stream(request, model, request_id, outputs, len(ids), plan)
        final = None
        async for _, output in outputs:
            final = output
        choices = []
        for c in final.outputs:
            message, finish_reason = self.reader(plan).whole(c.text, c.finish_reason)
            choices.append({"index": c.index, "message": message, "logprobs": self._logprobs(request, c),
                            "finish_reason": finish_reason, "stop_reason": c.stop_reason})
        generated = sum(len(c.token_ids) for c in final.outputs)
        return {"id": request_id, "object": "chat.completion", "created": now(), "model": model,
                "choices": choices, "usage": usage(len(ids), generated)}

    def prepare(self, request: ChatCompletionRequest) -> tuple[ToolPlan | None, list[int], SamplingParams]:
        """The request's tool plan, prompt token ids and parameters, checked against the limits."""
        plan = self.tool_plan(request)
        ids = self.render(request)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None \
            else request.max_tokens
        params = self.sampling_params(request, len(ids), max_tokens, explicit=max_tokens is not None)
        if plan is not None and isinstance(params, SamplingParams):
            if plan.constraint is not None:
                params = replace(params, structured_outputs=plan.constraint)
            if plan.mode == "auto" and not self.parsers.tool.skip_special_tokens:
                params = replace(params, skip_special_tokens=False)   # the parser reads markers that are special
        self.check_request_tokens([len(ids)], [params])
        return plan, ids, params

    def _stream(self, request: ChatCompletionRequest, model: str, request_id: str, outputs,
                prompt_tokens: int, plan: ToolPlan | None) -> AsyncIterator[str]:
        include_usage = wants_usage(request)
        base = {"id": request_id, "object": "chat.completion.chunk", "created": now(), "model": model}
        tracker, generated = DeltaTracker(), {}
        readers = [self.reader(plan) for _ in range(request.n)]

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
                    deltas = readers[c.index].feed(text)
                    if finishing:
                        held, finish_reason = readers[c.index].finish(c.finish_reason)
                        deltas += held
                    for delta in deltas or ([{"content": ""}] if not finishing else []):
                        yield chunk(c.index, delta, logprobs=logprobs)   # a token without text yet still gets one
                        logprobs = None
                    if finishing:
                        yield chunk(c.index, {}, finish_reason, logprobs)

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
