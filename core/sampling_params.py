"""Per-request sampling parameters, named as vLLM names them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvserve.core.config import check_int


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16         # None: up to the model's context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        check_int("n", self.n, 1)
        _check_float("temperature", self.temperature, 0.0, math.inf, "a number >= 0 (0 means greedy)")
        _check_float("top_p", self.top_p, 0.0, 1.0, "in (0, 1]", low_open=True)
        _check_float("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or an integer >= 1, got {self.top_k!r}")
        check_int("seed", self.seed, 0, allow_none=True)
        check_int("max_tokens", self.max_tokens, 1, allow_none=True)
        check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        if self.stop_token_ids is not None:
            for token in self.stop_token_ids:
                check_int("stop_token_ids[]", token, 0)
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        self.stop_strings = stops
        for name, default in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
                              ("logprobs", None)):
            if getattr(self, name) != default:
                raise ValueError(f"{name} is not supported yet; leave it at its default {default}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_float(name: str, value, low: float, high: float, allowed: str, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise ValueError(f"{name} must be {allowed}, got {value}")
