"""Per-request sampling parameters, named as vLLM names them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvserve.core.options import check_int
from kvserve.core.structured_outputs.params import KINDS as CONSTRAINT_KINDS
from kvserve.core.structured_outputs.params import StructuredOutputsParams

MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1    # generators take 64 bits; the n samples of a request use seed .. seed + n - 1
PENALTY_LIMIT = 2.0             # presence and frequency penalties lie in [-2, 2]
MAX_REPETITION_PENALTY = 2.0
LOGIT_BIAS_LIMIT = 100.0
GREEDY_BELOW = 1e-5     # a temperature this small is greedy, as in vLLM: dividing by it overflows the logits


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop.

    Before temperature and the top-k/top-p/min-p filters, the logits go through, in this order: the
    min_tokens ban on stop tokens, bad_words, logit_bias, then repetition_penalty (divides positive and
    multiplies negative logits of every prompt or output token), frequency_penalty (minus penalty x count) and
    presence_penalty (minus penalty once), the last two on output tokens only.

    logprobs=k and prompt_logprobs=k (k in [0, 20]) report, per generated or prompt token, its logprob and rank
    (1: the most likely) and the k most likely tokens (k=0: the token alone). Like vLLM v1's default
    ("raw_logprobs"), they are the float32 log_softmax of the model's raw logits: before the min_tokens ban,
    bad_words, logit_bias, penalties, temperature and top-k/top-p/min-p.
    """

    n: int = 1
    best_of: int | None = None          # sample this many (>= n) and return the n of highest cumulative logprob
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
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    bad_words: list[str] | None = None          # words never generated (with and without a leading space)
    logprobs: int | None = None                 # top-k logprobs per generated token, k in [0, 20]
    prompt_logprobs: int | None = None          # top-k logprobs per prompt token, k in [0, 20]
    speculate: bool = True                      # False: no speculative proposals, where the engine makes them
    structured_outputs: StructuredOutputsParams | None = None   # a JSON schema, regex, choice or grammar to follow
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        check_int("n", self.n, 1)
        check_int("best_of", self.best_of, self.n, allow_none=True)
        _check_float("temperature", self.temperature, 0.0, math.inf, "a finite number >= 0 (0 means greedy)")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        _check_float("top_p", self.top_p, 0.0, 1.0, "in (0, 1]", low_open=True)
        _check_float("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or an integer >= 1, got {self.top_k!r}")
        check_int("seed", self.seed, 0, MAX_SEED, allow_none=True)
        check_int("max_tokens", self.max_tokens, 1, allow_none=True)
        check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        if self.stop_token_ids is not None:
            for token in self.stop_token_ids:
                check_int("stop_token_ids[]", token, 0)
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        self.stop_strings = stops
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), -PENALTY_LIMIT, PENALTY_LIMIT,
                         f"in [{-PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}]")
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, MAX_REPETITION_PENALTY,
                     f"in (0, {MAX_REPETITION_PENALTY:g}] (1 means off)", low_open=True)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
            for token, bias in self.logit_bias.items():
                check_int("logit_bias token id", token, 0)
                _check_float(f"logit_bias[{token}]", bias, -LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT,
                             f"in [{-LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]")
        if self.bad_words is not None and (not isinstance(self.bad_words, list) or any(
                not isinstance(w, str) or not w.strip() for w in self.bad_words)):
            raise ValueError(f"bad_words must be a list of non-blank strings, got {self.bad_words!r}")
        check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS, allow_none=True)
        check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS, allow_none=True)
        if not isinstance(self.speculate, bool):
            raise ValueError(f"speculate must be true or false, got {self.speculate!r}")
        if isinstance(self.structured_outputs, dict):
            unknown = sorted(set(self.structured_outputs) - set(CONSTRAINT_KINDS), key=str)
            if unknown:
                raise ValueError(f"structured_outputs has unknown keys {unknown}; allowed: "
                                 f"{', '.join(CONSTRAINT_KINDS)}")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise TypeError(f"structured_outputs must be a StructuredOutputsParams, got "
                                f"{type(self.structured_outputs).__name__}")
            if self.min_tokens:
                raise ValueError("min_tokens cannot be combined with structured_outputs: the constraint decides where "
                                 "the output may end; remove min_tokens")

    @property
    def num_samples(self) -> int:
        """How many sequences the request samples: best_of, or n."""
        return self.best_of or self.n

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_float(name: str, value, low: float, high: float, allowed: str, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise ValueError(f"{name} must be {allowed}, got {value}")


@dataclass
class BeamSearchParams:
    """Beam search as transformers runs it (``generate(num_beams=..., do_sample=False)``), with vLLM's names.

    Each step keeps the ``beam_width`` most likely continuations among every beam's candidates; a beam that
    ends with EOS (or reaches ``max_tokens``) becomes a finished hypothesis scored by its summed logprob divided
    by (generated tokens) ** ``length_penalty``. ``early_stopping``: True stops once ``beam_width`` hypotheses
    are finished; False stops when the best running beam, at its current length, cannot beat the worst
    finished one; "never" stops only when no running beam could, at any allowed length. ``temperature`` > 0
    divides the logits before their log_softmax; 0 uses them as they are.
    """

    beam_width: int
    max_tokens: int | None = 16         # None: up to the model's context length
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self):
        check_int("beam_width", self.beam_width, 1)
        check_int("max_tokens", self.max_tokens, 1, allow_none=True)
        _check_float("temperature", self.temperature, 0.0, math.inf, "a finite number >= 0 (0 means the raw logits)")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) or \
                not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
