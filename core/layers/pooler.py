"""Pools each prompt's hidden states into one embedding: MEAN, CLS or LAST, then normalized, as the checkpoint's
sentence-transformers files say (modules.json, its Pooling module's config.json, a Normalize module), or as a GGUF
file's pooling_type says, else as vLLM does for the architecture (CLS for BERT encoders, LAST for a generative model
run as a pooling one; normalized)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvserve.core.pooling_params import PoolingParams

POOLING_TYPES = ("MEAN", "CLS", "LAST")
ST_PREFIX = "sentence_transformers.models."
ST_MODULES = ("Transformer", "Pooling", "Normalize")   # the sentence-transformers modules kvserve runs
# A Pooling module's config.json flags, and the pooling type each asks for.
ST_POOLING_MODES = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS",
                    "pooling_mode_lasttoken": "LAST"}


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str
    normalize: bool
    hidden_size: int
    matryoshka: bool = False   # trained so that its embeddings' first values make a smaller embedding
    matryoshka_dimensions: tuple[int, ...] = ()   # the truncations it was trained for; empty: any

    @classmethod
    def of(cls, folder: str, hf_config, default_type: str) -> PoolerConfig:
        """The pooling of the checkpoint in ``folder``: its sentence-transformers files', else the pooling a GGUF
        file names (its config's ``gguf_pooling_type``) or ``default_type``, and normalized, as llama.cpp does."""
        pooling_type, normalize = getattr(hf_config, "gguf_pooling_type", default_type), True
        modules_file = os.path.join(folder, "modules.json")
        if os.path.isfile(modules_file):
            with open(modules_file) as f:
                modules = {m["type"].removeprefix(ST_PREFIX): m for m in json.load(f)}
            unknown = sorted(set(modules) - set(ST_MODULES))
            if unknown:
                raise ValueError(f"{modules_file} names the sentence-transformers modules {unknown}, which kvserve "
                                 f"does not run; supported: {', '.join(ST_MODULES)}")
            normalize = "Normalize" in modules
            if "Pooling" in modules:
                pooling_type = _pooling_type(os.path.join(folder, modules["Pooling"]["path"], "config.json"))
        matryoshka_dimensions = tuple(getattr(hf_config, "matryoshka_dimensions", None) or ())
        matryoshka = bool(matryoshka_dimensions) or bool(getattr(hf_config, "is_matryoshka", False))
        return cls(pooling_type, normalize, hf_config.hidden_size, matryoshka, matryoshka_dimensions)

    def check(self, params: PoolingParams, model: str | None = None) -> None:
        """A ValueError naming ``dimensions`` unless the model (``model``: its name, for the message) can give
        them."""
        dimensions, who = params.dimensions, "this model" if model is None else f'model "{model}"'
        if dimensions is None:
            return
        if not self.matryoshka:
            raise ValueError(f"dimensions={dimensions}: {who} does not support matryoshka representation (its "
                             f"config sets neither is_matryoshka nor matryoshka_dimensions), so its embeddings "
                             f"cannot be shortened; leave dimensions unset")
        if self.matryoshka_dimensions and dimensions not in self.matryoshka_dimensions:
            raise ValueError(f"dimensions={dimensions}: {who} supports only the matryoshka dimensions "
                             f"{list(self.matryoshka_dimensions)}")
        if dimensions > self.hidden_size:
            raise ValueError(f"dimensions={dimensions}: {who} gives embeddings of {self.hidden_size} values; "
                             f"allowed: 1..{self.hidden_size}")


def _pooling_type(path: str) -> str:
    with open(path) as f:
        modes = {name for name, on in json.load(f).items() if name.startswith("pooling_mode") and on is True}
    if len(modes) != 1 or not modes <= ST_POOLING_MODES.keys():
        raise ValueError(f"{path} asks for pooling {sorted(modes) or 'none'}; kvserve pools with exactly one of "
                         f"{', '.join(ST_POOLING_MODES)}")
    return ST_POOLING_MODES[modes.pop()]


class Pooler:
    """Turns the hidden states of a step's prompts, each computed whole and laid out one after another, into one
    embedding per prompt: pooled in float32, cut to the request's dimensions, then normalized where asked."""

    def __init__(self, config: PoolerConfig):
        if config.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling type {config.pooling_type!r} is not supported; allowed: "
                             f"{', '.join(POOLING_TYPES)}")
        self.config = config

    def __call__(self, hidden: torch.Tensor, lengths: list[int], params: list[PoolingParams]) -> list[list[float]]:
        device, kind = hidden.device, self.config.pooling_type
        counts = torch.tensor(lengths, device=device)
        ends = counts.cumsum(0)
        if kind == "MEAN":
            prompt_of = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts,
                                                output_size=hidden.shape[0])
            sums = hidden.new_zeros(len(lengths), hidden.shape[1], dtype=torch.float32)
            pooled = sums.index_add_(0, prompt_of, hidden.float()) / counts[:, None]
        else:
            pooled = hidden[ends - counts if kind == "CLS" else ends - 1].float()
        dimensions = [p.dimensions or pooled.shape[1] for p in params]
        # Matryoshka truncation comes before normalization: the kept values are normalized among themselves.
        kept = torch.arange(pooled.shape[1], device=device) < torch.tensor(dimensions, device=device)[:, None]
        pooled = pooled * kept
        normalize = torch.tensor([self.config.normalize if p.normalize is None else p.normalize for p in params],
                                 device=device)
        pooled = torch.where(normalize[:, None], F.normalize(pooled, dim=-1), pooled)
        return [row[:n] for row, n in zip(pooled.tolist(), dimensions)]
