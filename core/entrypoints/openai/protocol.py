"""Request bodies of the OpenAI-compatible API. Unknown fields are rejected, never silently ignored."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvserve.core.entrypoints.openai.constraints import request_constraint
from kvserve.core.sampling_params import (LOGIT_BIAS_LIMIT, MAX_LOGPROBS, MAX_REPETITION_PENALTY, MAX_SEED,
                                          PENALTY_LIMIT, BeamSearchParams, SamplingParams)

# Fields that shape sampling, which beam search (n beams, max_tokens, temperature, ignore_eos) cannot honour.
NOT_FOR_BEAM_SEARCH = ("top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "include_stop_str_in_output",
                       "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                       "bad_words", "logprobs", "top_logprobs", "best_of", "response_format", "structured_outputs",
                       "guided_json", "guided_regex", "guided_choice", "guided_grammar")


# The bounds the schema shows are those SamplingParams checks; the vocabulary's size is known only at run time.
TokenId = Annotated[int, Field(ge=0)]
Penalty = Annotated[float | None, Field(ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)]
Finite = Annotated[float | None, Field(allow_inf_nan=False)]
Logprobs = Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)]


class Strict(BaseModel):
    # strict: JSON true is not the token id 1, nor "5" a count
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """Fields shared by completions and chat completions, including vLLM's extensions."""

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: Finite = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    speculate: bool = True              # kvserve's: false keeps this request out of speculative decoding
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY)
    # token id (a string, as JSON keys are) -> bias
    logit_bias: dict[str, Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]] | None = None
    bad_words: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    use_beam_search: bool = False       # vLLM's extension: beam search with n beams, returning all n
    length_penalty: Finite = None
    early_stopping: bool | Literal["never"] | None = None
    response_format: dict[str, Any] | None = None   # OpenAI's: text, json_object or json_schema
    structured_outputs: dict[str, Any] | None = None   # vLLM's: one of json, regex, choice, grammar, json_object
    guided_json: dict[str, Any] | str | bool | None = None   # vLLM's older names for structured_outputs' keys
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def unsupported(self) -> list[str]:
        """Fields set to something the engine cannot honour yet."""
        return []

    def endpoint_params(self) -> dict:
        """SamplingParams fields that each endpoint spells its own way (logprobs, prompt_logprobs, best_of)."""
        return {}

    def sampling_params(self, max_tokens: int | None, defaults: dict) -> SamplingParams | BeamSearchParams:
        """The engine parameters of this request: beam search's with use_beam_search, else sampling's, which take
        ``defaults`` (the model's) for the sampling fields the request leaves out."""
        if self.use_beam_search:
            return self.beam_search_params(max_tokens)
        for name in ("length_penalty", "early_stopping"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} applies only to beam search; set use_beam_search: true or remove it")
        optional = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                        presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                        repetition_penalty=self.repetition_penalty)
        optional = {**{k: v for k, v in defaults.items() if k in optional},
                    **{k: v for k, v in optional.items() if v is not None}}
        return SamplingParams(
            n=self.n, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens, speculate=self.speculate,
            logit_bias=self.token_id_biases(), bad_words=self.bad_words,
            structured_outputs=request_constraint(self), **self.endpoint_params(),
            **optional)

    def beam_search_params(self, max_tokens: int | None) -> BeamSearchParams:
        defaults = type(self).model_fields
        for name in NOT_FOR_BEAM_SEARCH:
            if name in defaults and getattr(self, name) != defaults[name].default:
                raise ValueError(f"{name} cannot be used with use_beam_search, which honours n (the beam width), "
                                 "max_tokens, temperature, ignore_eos, length_penalty and early_stopping")
        optional = dict(temperature=self.temperature, length_penalty=self.length_penalty,
                        early_stopping=self.early_stopping)
        return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                                **{k: v for k, v in optional.items() if v is not None})

    def token_id_biases(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        bad = [key for key in self.logit_bias if not key.strip().isdigit()]
        if bad:
            raise ValueError(f"logit_bias keys must be token ids (strings of digits), got {bad}")
        return {int(key): bias for key, bias in self.logit_bias.items()}


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=0)   # 0 with echo: score the prompt, generate nothing
    echo: bool = False
    logprobs: Logprobs = None
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        return super().unsupported() + (["suffix"] if self.suffix else [])

    def endpoint_params(self) -> dict:
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise ValueError(f"best_of={self.best_of} > n={self.n} cannot be streamed: the best completions are "
                             "known only when all are done; set stream to false or best_of to n")
        # echo returns the prompt too, so its tokens need logprobs as well.
        return dict(logprobs=self.logprobs, prompt_logprobs=self.logprobs if self.echo else None, best_of=self.best_of)


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None     # the participant's name, passed to the chat template as vLLM does
    tool_calls: list[dict[str, Any]] | None = None   # an assistant's calls, sent back with their results
    tool_call_id: str | None = None                  # the call a tool message answers
    # What an assistant reply carries when a client sends it back: accepted while empty, as nothing uses them.
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None
    annotations: list[Any] | None = None

    def unsupported(self) -> list[str]:
        return [name for name in ("function_call", "refusal", "audio", "annotations") if getattr(self, name)]

    def template_message(self, i: int) -> dict[str, Any]:
        """The message as chat templates take it: text content, developer as system (templates know no
        developer role), an assistant's calls with their arguments as objects, a tool result's call id."""
        if self.unsupported():
            raise ValueError(f"messages[{i}].{self.unsupported()[0]} is not supported; send the message's role, "
                             "content, name, tool_calls or tool_call_id only")
        content = self.content or ""
        if isinstance(content, list):
            kinds = {part.get("type") for part in content}
            if kinds - {"text"}:
                raise ValueError(f"messages[{i}].content has parts of type {sorted(map(str, kinds - {'text'}))}; "
                                 "only 'text' parts are supported")
            content = "".join(part.get("text", "") for part in content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError(f"messages[{i}]: tool_call_id belongs to, and is required on, messages of role 'tool'")
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            if self.role != "assistant":
                raise ValueError(f"messages[{i}].tool_calls belongs to messages of role 'assistant'")
            message["tool_calls"] = [template_call(call, f"messages[{i}].tool_calls[{j}]")
                                     for j, call in enumerate(self.tool_calls)]
        return message


def template_call(call: dict[str, Any], where: str) -> dict[str, Any]:
    function = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(function, dict) or \
            not isinstance(function.get("name"), str):
        raise ValueError(f"{where} must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                         f"'arguments': ...}}}}, got {call!r}")
    arguments = function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object (as text), got "
                         f"{function.get('arguments')!r}")
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Logprobs = None
    add_generation_prompt: bool = True
    chat_template: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None             # none, auto (the default with tools), required, or a named function
    parallel_tool_calls: bool = True

    def endpoint_params(self) -> dict:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ValueError("top_logprobs needs logprobs: true")
        return dict(logprobs=(self.top_logprobs or 0) if self.logprobs else None)

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as the chat template takes them."""
        return [message.template_message(i) for i, message in enumerate(self.messages)]


class EmbeddingRequest(Strict):
    """OpenAI's embeddings request: ``input`` a text, texts, token ids or lists of them, one embedding each."""

    model: str | None = None
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"   # base64: the little-endian float32 values' bytes
    dimensions: int | None = Field(None, ge=1)   # a matryoshka model's shorter embeddings
    user: str | None = None


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[TokenId]


class LoadLoRAAdapterRequest(Strict):
    """vLLM's body for POST /v1/load_lora_adapter."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(Strict):
    """vLLM's body for POST /v1/unload_lora_adapter."""

    lora_name: str = Field(min_length=1)
