"""Speculative decoding: proposals of the next tokens that the target model verifies in one forward pass over
them, so that a memory-bound decode step can yield several tokens without changing any of them.

``ngram`` (prompt lookup) proposes the tokens that followed the latest earlier occurrence of the sequence's last
n tokens, n from ``prompt_lookup_max`` down to ``prompt_lookup_min``; ``draft_model``, a smaller model's greedy
tokens (draft_model.py); ``medusa``, extra heads' tokens from the target's hidden state (medusa.py); ``eagle``,
EAGLE's draft's greedy tokens from the target's hidden states (eagle.py). A greedy
sequence keeps the proposed tokens that equal the target's argmax at their positions, then takes the target's
own token at the first that does not (or after the last): exactly the tokens it would have produced one step at
a time. A sampled one keeps them by the rejection-sampling rule (``verify``), so its tokens are distributed as
the target's samples are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvserve.core.layers.sampler import SamplingBatch, exponential_noise, probabilities
from kvserve.core.quantization import METHODS as QUANTIZATION_METHODS

if TYPE_CHECKING:   # the engine's config reads SpeculativeConfig before sequences exist
    from kvserve.core.config import ModelConfig
    from kvserve.core.engine.sequence import Sequence

METHODS = ("ngram", "draft_model", "medusa", "eagle")
# The keys each method takes besides method and num_speculative_tokens
METHOD_KEYS = {"ngram": ("prompt_lookup_max", "prompt_lookup_min"),
               "draft_model": ("model", "revision", "quantization"), "medusa": ("model", "revision"),
               "eagle": ("model", "revision")}
MODEL_KINDS = {"draft_model": "the draft model's folder, .gguf file or model id",
               "medusa": "the Medusa heads' folder or model id", "eagle": "the EAGLE draft's folder or model id"}
KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model", "revision",
        "quantization")
UNDRAFTED = -1   # a placeholder proposal token, as many as a draft model may propose once the step is scheduled


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
    model: str | None = None   # the draft model's folder, .gguf file or id, the Medusa heads' or the EAGLE draft's
    revision: str | None = None   # the model id's branch, tag or commit
    quantization: str | None = None   # the draft's, as the target's quantization option names them

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
        foreign = sorted(set(options) - {"method", "num_speculative_tokens", *METHOD_KEYS[method]})
        if foreign:
            raise ValueError(f"speculative_config keys {foreign} do not apply to method {method!r}, which takes "
                             f"{', '.join(METHOD_KEYS[method])}")
        if method in MODEL_KINDS and not (isinstance(options.get("model"), str) and options["model"]):
            raise ValueError(f"speculative_config method {method!r} needs 'model': {MODEL_KINDS[method]}, got "
                             f"{options.get('model')!r}")
        if not isinstance(options.get("revision", ""), str):
            raise ValueError(f"speculative_config revision must be a branch, tag or commit of the model id (a "
                             f"string), got {options['revision']!r}")
        quantization = options.get("quantization")
        if quantization is not None and quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"speculative_config quantization {quantization!r} is not supported; allowed: None, "
                             f"{', '.join(map(repr, QUANTIZATION_METHODS))}")
        counts = {key: _positive_int(key, options[key]) for key in KEYS[1:4] if key in options}
        config = cls(method, model=options.get("model"), revision=options.get("revision"), quantization=quantization,
                     **counts)
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError(f"speculative_config prompt_lookup_min={config.prompt_lookup_min} exceeds "
                             f"prompt_lookup_max={config.prompt_lookup_max}")
        return config

    def source(self, target: ModelConfig) -> ModelConfig:
        """Where the draft, heads or EAGLE draft come from: ``model`` at ``revision``, in the target's download_dir
        and with its trust_remote_code, as vLLM's drafts are."""
        from kvserve.core.config import ModelConfig

        return ModelConfig(model=self.model, revision=self.revision, download_dir=target.download_dir,
                           trust_remote_code=target.trust_remote_code)


class NgramIndex:
    """Where the latest occurrence of each n-gram (n in [min_n, max_n]) of a sequence's tokens ends, but for those
    ending at its newest token: grown by the tokens appended since the last lookup, so that a lookup costs
    O(max_n) however long the sequence is."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.ends: dict[tuple[int, ...], int] = {}
        self.indexed = 0   # the n-grams ending before this position are in

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        """Up to ``num_tokens`` tokens that followed the latest earlier occurrence of the last n tokens (the
        longest n in [min_n, max_n] that occurs), or none."""
        newest = len(token_ids) - 1
        for n in range(self.min_n, self.max_n + 1):
            first = max(self.indexed, n - 1)   # the first end of an n-gram not in yet
            # The n-grams ending at first .. newest - 1, in order, so that the latest end of each stays.
            grams = zip(*(token_ids[first - n + 1 + i:newest - n + 1 + i] for i in range(n)))
            self.ends.update(zip(grams, range(first, newest)))
        self.indexed = max(self.indexed, newest)
        for n in range(min(self.max_n, newest), self.min_n - 1, -1):
            end = self.ends.get(tuple(token_ids[-n:]))
            if end is not None:
                return token_ids[end + 1:end + 1 + num_tokens]
        return []


def verify(seqs: list[Sequence], logits: torch.Tensor, batch: SamplingBatch,
           argmax) -> tuple[list[tuple[Sequence, int]], dict, list[int]]:
    """((sequence, token) for each token the speculating ``seqs`` gain, {sequence: proposed tokens accepted},
    the row of ``logits`` that chose each token), from the target's logits at each one's last token and its
    proposal, in order (``batch``: their sampling parameters, row by row).

    A proposal is certain of its tokens, so the rejection-sampling rule keeps a sampled sequence's proposed token
    with the target's probability of it, and at the first one it rejects samples from the target's distribution
    without that token, renormalized: each token is distributed exactly as the target would sample it."""
    proposed = torch.tensor([t for seq in seqs for t in seq.proposal + [-1]], device=logits.device)   # -1: bonus
    greedy = argmax(logits)
    kept, chosen = proposed == greedy, greedy
    if not batch.all_greedy:
        sampled = batch.temperatures > 0
        probs = probabilities(logits, batch)
        proposed_probs = probs.gather(1, proposed.clamp(min=0)[:, None]).squeeze(1)
        uniform = exponential_noise(proposed_probs, batch.generators).neg().exp()   # in (0, 1]
        residual = probs * (torch.arange(probs.shape[1], device=probs.device) != proposed[:, None])
        kept = torch.where(sampled, uniform <= proposed_probs, kept)
        chosen = torch.where(sampled, argmax(residual / exponential_noise(residual, batch.generators)), chosen)
    kept, chosen = torch.stack([kept.long(), chosen]).tolist()
    tokens, accepted, rows, start = [], {}, [], 0
    for seq in seqs:
        k = len(seq.proposal)
        n = next((i for i in range(k) if not kept[start + i]), k)
        tokens += [(seq, token) for token in seq.proposal[:n] + [chosen[start + n]]]
        rows += range(start, start + n + 1)
        accepted[seq], start = n, start + k + 1
    return tokens, accepted, rows


def speculates(seq: Sequence) -> bool:
    """Whether ``seq`` may take proposals this step: a sampled sequence about to decode, not opted out, whose
    logits go to sampling as they are (no penalties, biases, bans, or stop tokens still masked; a grammar's mask
    is applied to each position it verifies)."""
    params = seq.params
    return (seq.num_uncomputed_tokens == 1 and seq.beam is None and params.speculate and not params.uses_penalties
            and not params.logit_bias and not params.bad_words and seq.num_output_tokens >= params.min_tokens)


class Proposer:
    """Each step's proposals for the running sequences that speculate; keeps each one's n-gram index."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.indexes: dict[int, NgramIndex] = {}   # seq_id -> its n-gram index

    def propose(self, seqs: list[Sequence]) -> None:
        """Give each sequence that speculates its proposal, no longer than what its token limit leaves (a draft
        model's or EAGLE's: placeholders, drafted once the scheduler has trimmed them to the step's budget)."""
        config = self.config
        for seq in seqs:
            room = min(config.num_speculative_tokens, seq.max_total_tokens - seq.num_tokens - 1)
            if room <= 0 or not speculates(seq):
                seq.proposal = []
            elif config.method == "ngram":
                index = self.indexes.get(seq.seq_id)
                if index is None:
                    index = self.indexes[seq.seq_id] = NgramIndex(config.prompt_lookup_min, config.prompt_lookup_max)
                seq.proposal = index.propose(seq.token_ids, room)
            elif config.method == "medusa":
                seq.proposal = seq.head_proposal[:room]
            elif seq.params.structured_outputs is not None:   # its grammar's masks are made before any drafting
                seq.proposal = []
            elif config.method == "draft_model" or seq.num_tokens > 1:   # EAGLE's needs a hidden state before
                seq.proposal = [UNDRAFTED] * room
            else:
                seq.proposal = []

    def release(self, seq: Sequence) -> None:
        self.indexes.pop(seq.seq_id, None)
