"""Logprobs in OpenAI's two shapes: the completions API's parallel lists, and the chat API's content list."""
from __future__ import annotations

from typing import Callable

from kvserve.core.outputs import Logprob, PositionLogprobs

# JSON has no -inf; OpenAI (and vLLM) send this floor instead.
LOGPROB_FLOOR = -9999.0


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, LOGPROB_FLOOR)


def completion_logprobs(token_ids: list[int], entries: list[PositionLogprobs | None], decode: Callable[[int], str],
                        text_offset: int = 0) -> tuple[dict, int]:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"} of these tokens, and the offset after them.

    top_logprobs maps each token string to its logprob, for the actual token and the top-k (so up to k + 1);
    a position without logprobs (the first prompt token) has None.
    """
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(token_ids, entries):
        text = decode(token) if entry is None else entry[token].decoded_token
        out["tokens"].append(text)
        out["token_logprobs"].append(None if entry is None else _value(entry[token]))
        out["top_logprobs"].append(None if entry is None else {e.decoded_token: _value(e) for e in entry.values()})
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out, text_offset


def _chat_token(logprob: Logprob) -> dict:
    text = logprob.decoded_token
    return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], entries: list[PositionLogprobs], top_k: int) -> dict:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs": [the k most likely, as the same three]}]}."""
    content = []
    for token, entry in zip(token_ids, entries):
        top = sorted(entry.values(), key=lambda e: -e.logprob)[:top_k]
        content.append({**_chat_token(entry[token]), "top_logprobs": [_chat_token(e) for e in top]})
    return {"content": content}
