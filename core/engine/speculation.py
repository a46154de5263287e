"""Speculative decoding: proposals of the next tokens that the target model verifies in one forward pass over
them, so that a memory-bound decode step can yield several tokens without changing any of them.

``ngram`` (prompt lookup) proposes the tokens that followed the latest earlier occurrence of the sequence's last
n tokens, n from ``prompt_lookup_max`` down to ``prompt_lookup_min``. A greedy sequence keeps the proposed tokens
that equal the target's argmax at their positions, then takes the target's own token at the first that does not
(or after the last): exactly the tokens it would have produced one step at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:   # the engine's config reads SpeculativeConfig before sequences exist
    from kvserve.core.engine.sequence import Sequence

METHODS = ("ngram",)
KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"speculative_config {name!r} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1

    @classmethod
    def from_dict(cls, options: Any) -> SpeculativeConfig:
        """vLLM's ``speculative_config`` keys, each checked, with a clear error for anything else."""
        if not isinstance(options, dict):
            raise ValueError(f"speculative_config must be a dict (JSON object) such as "
                             f"{{'method': 'ngram', 'num_speculative_tokens': 3}}, got {options!r}")
        unknown = sorted(set(options) - set(KEYS), key=str)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; allowed: {', '.join(KEYS)}")
        method = options.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config method {method!r} is not supported yet; supported: "
                             f"{', '.join(map(repr, METHODS))}")
        if "num_speculative_tokens" not in options:
            raise ValueError("speculative_config needs 'num_speculative_tokens' (tokens proposed per step)")
        config = cls(method, *(_positive_int(key, options[key]) if key in options else getattr(cls, key)
                               for key in KEYS[1:]))
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError(f"speculative_config prompt_lookup_min={config.prompt_lookup_min} exceeds "
                             f"prompt_lookup_max={config.prompt_lookup_max}")
        return config


def ngram_proposal(token_ids: list[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``num_tokens`` tokens that followed the latest earlier occurrence of the last n tokens (the longest
    n in [min_n, max_n] that occurs), or none."""
    for n in range(min(max_n, len(token_ids) - 1), min_n - 1, -1):
        suffix = token_ids[-n:]
        for start in range(len(token_ids) - n - 1, -1, -1):
            if token_ids[start:start + n] == suffix:
                return token_ids[start + n:start + n + num_tokens]
    return []


def accepted_tokens(proposal: list[int], target: list[int]) -> list[int]:
    """The greedy rule: the proposed tokens that equal the target's choices (``target``, one more than
    ``proposal``), then the target's token where they first differ, or its token after the last."""
    accepted = 0
    while accepted < len(proposal) and proposal[accepted] == target[accepted]:
        accepted += 1
    return target[:accepted + 1]


def verify(seqs: list[Sequence], logits: torch.Tensor, argmax) -> tuple[list[tuple[Sequence, int]], dict]:
    """((sequence, token) for each token the speculating ``seqs`` gain, {sequence: proposed tokens accepted}),
    from the target's logits at each one's last token and its proposal, in order."""
    targets = argmax(logits).tolist()
    sampled, accepted, start = [], {}, 0
    for seq in seqs:
        end = start + len(seq.proposal) + 1
        tokens = accepted_tokens(seq.proposal, targets[start:end])
        sampled += [(seq, token) for token in tokens]
        accepted[seq], start = len(tokens) - 1, end
    return sampled, accepted


def speculates(seq: Sequence) -> bool:
    """Whether ``seq`` may take proposals this step: a greedy sampled sequence about to decode whose logits go
    to the argmax as they are (no logprobs, penalties, biases, bans, or stop tokens still masked)."""
    params = seq.params
    return (seq.num_uncomputed_tokens == 1 and seq.beam is None and params.greedy and params.logprobs is None
            and not params.uses_penalties and not params.logit_bias and not params.bad_words
            and seq.num_output_tokens >= params.min_tokens)


def propose(seqs: list[Sequence], config: SpeculativeConfig) -> None:
    """Give each sequence that speculates its proposal, no longer than what its token limit leaves."""
    for seq in seqs:
        room = min(config.num_speculative_tokens, seq.max_total_tokens - seq.num_tokens - 1)
        seq.proposal = (ngram_proposal(seq.token_ids, room, config.prompt_lookup_min, config.prompt_lookup_max)
                        if room > 0 and speculates(seq) else [])
