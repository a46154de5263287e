"""What generation returns, shaped like vLLM's outputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvserve.core.lora.request import LoRARequest


@dataclass
class Logprob:
    """A token's log-probability under the model's raw logits, its rank (1: most likely), and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: {token id: Logprob} for the actual token and the top-k tokens.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None       # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None   # the stop token id or stop string that ended it
    cumulative_logprob: float | None = None        # sum of the generated tokens' logprobs (with logprobs=k)
    logprobs: list[PositionLogprobs] | None = None  # one per generated token (with logprobs=k)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None   # None for the first prompt token
    lora_request: LoRARequest | None = None   # the adapter it ran with


@dataclass
class BeamSearchSequence:
    """A finished beam, as vLLM's ``LLM.beam_search`` gives it: the prompt's tokens and the beam's together."""

    tokens: list[int]
    cum_logprob: float
    text: str                          # the generated text, without the EOS token
    finish_reason: str                 # "stop" (ended by EOS) or "length"
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]   # best first, by cum_logprob / generated tokens ** length_penalty


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """A pooling model's result for one prompt, as vLLM's ``LLM.embed`` returns it."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True
