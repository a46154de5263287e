"""Read a checkpoint folder's tensors, and copy them into a model through its packed-module mapping, checking every
name and shape."""
from __future__ import annotations

import fnmatch
import json
import os
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from kvserve.core.layers.linear import Linear, MergedLinear
from kvserve.core.loader.kv_scales import KvScaleReader
from kvserve.core.quantization import dequantize
from kvserve.plugins.interfaces import QuantizedWeight

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Weight files by preference, each with the index that names a sharded checkpoint's files.
WEIGHT_FILES = {"*.safetensors": "model.safetensors.index.json", "pytorch_model*.bin": "pytorch_model.bin.index.json"}


def weight_files(names: Iterable[str], index_path: Callable[[str], str]) -> list[str]:
    """Which of a Hugging Face checkpoint's files (``names``, relative to its folder) hold its weights: the shards
    its model.safetensors.index.json names (not the consolidated.safetensors that some repos ship beside them),
    else its *.safetensors, else the same of its PyTorch pickles. ``index_path(name)``: where the index file
    ``name`` is read (downloaded first, for a repo)."""
    top_level = {name for name in names if "/" not in name}
    for pattern, index in WEIGHT_FILES.items():
        if index in top_level:
            with open(index_path(index)) as f:
                return sorted(set(json.load(f)["weight_map"].values()))
        if found := sorted(fnmatch.filter(top_level, pattern)):
            return found
    return []


def read_weights(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Name and tensor of every weight in the folder's weight files; PyTorch pickles are read with weights_only, so
    that they can run no code."""
    files = weight_files(os.listdir(folder), lambda index: os.path.join(folder, index))
    if not files:
        raise ValueError(f"model folder {folder!r} has no *.safetensors (or pytorch_model*.bin) weights")
    if missing := [file for file in files if not os.path.isfile(os.path.join(folder, file))]:
        raise ValueError(f"model folder {folder!r} lacks {', '.join(missing)}, which its index names")
    for path in (os.path.join(folder, file) for file in files):
        if path.endswith(".bin"):
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()
        else:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]]) -> None:
    """A QuantizedWeight (GGUF's blocks, a GPTQ, AWQ, AutoRound, compressed-tensors or fp8 layer) stays quantized
    in its Linear layer, which drops its float weight, unless the layer's other shards are not quantized alike.
    KV cache scales go to their attention layers.

    The model's ``packed_modules_mapping`` {checkpoint module: (model module, shard)} renames a module (shard None),
    sends it to a shard of a merged layer, or, with a tuple of shard names, splits one checkpoint tensor holding
    each shard whole, one after another along its rows (GPT-2's c_attn, Phi-3's qkv_proj), into them. A model whose
    checkpoints name or lay out tensors otherwise (GPT-2's Conv1D weights, stored transposed) maps them first in
    its ``map_checkpoint(weights)``."""
    params = dict(model.named_parameters())
    kv_scales = KvScaleReader(model)
    mapping: dict[str, tuple[str, object]] = getattr(model, "packed_modules_mapping", {})
    tied = getattr(model, "tie_word_embeddings", False)
    ignored = getattr(model, "ignored_weights", ())   # copies of weights the model takes from elsewhere
    loaded: set[tuple[str, str | None]] = set()
    if hasattr(model, "map_checkpoint"):
        weights = model.map_checkpoint(weights)
    for name, tensor in weights:
        quantized = isinstance(tensor, QuantizedWeight)
        # A tied head shares the embedding's parameter, unless the checkpoint quantized it (GGUF's blocks).
        if (name.endswith(IGNORED_SUFFIXES) or name in ignored
                or (tied and name == "lm_head.weight" and not quantized)):
            continue
        if not quantized and kv_scales.take(name, tensor):
            continue
        target, shard = name, None
        for source, (packed, shard_id) in mapping.items():
            if f".{source}." in name:
                target, shard = name.replace(f".{source}.", f".{packed}."), shard_id
                break
        # A tuple of shard names (not a mixture of experts' (expert, part) shard): a fused checkpoint tensor.
        fused = isinstance(shard, tuple) and all(isinstance(part, str) for part in shard)
        shards = shard if fused else (shard,)
        if quantized and fused:
            raise ValueError(f"checkpoint tensor {name!r} is quantized and fuses {', '.join(shards)}: quantized "
                             f"fused tensors are not supported")
        module = _module_of(model, target) if quantized else None
        param = params.get(target)
        if quantized and not isinstance(module, Linear):
            raise ValueError(f"checkpoint tensor {name!r} is quantized, but {type(model).__name__} has no linear "
                             f"layer {target.rpartition('.')[0]!r} to hold it")
        if param is None and not quantized:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        with torch.no_grad():
            if quantized:
                module.load_quantized(tensor, shard)
            elif fused:
                layer = model.get_submodule(target.rpartition(".")[0])
                for part, rows in _fused_parts(layer, name, tensor, shards):
                    layer.load_shard(param, rows, part)
            elif shard is not None:
                model.get_submodule(target.rpartition(".")[0]).load_shard(param, tensor, shard)
            elif hasattr(module := model.get_submodule(target.rpartition(".")[0]), "checkpoint_slice"):
                param.copy_(module.checkpoint_slice(target.rpartition(".")[2], tensor))
            elif param.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            else:
                param.copy_(tensor)
        loaded.update((target, part) for part in shards)
    missing = sorted(f"{name}[{shard}]" if shard else name
                     for name, shard in _expected(model) - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {', '.join(missing[:5])}")
    kv_scales.finish()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear):
                module.finish_loading(lambda weight: dequantize(weight, torch.float32))


def _fused_parts(layer: MergedLinear, name: str, tensor: torch.Tensor,
                 shards: tuple[str, ...]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each of ``shards`` with its rows of ``tensor``, which holds each whole (all ranks' rows), one after another."""
    totals = [layer.checkpoint_rows[shard][1] for shard in shards]
    if tensor.shape[0] != sum(totals):
        raise ValueError(f"checkpoint tensor {name!r} has {tensor.shape[0]} rows, the model expects {sum(totals)} "
                         f"({' + '.join(f'{total} {shard}' for shard, total in zip(shards, totals))})")
    return zip(shards, tensor.split(totals))


def _module_of(model: nn.Module, parameter: str) -> nn.Module | None:
    try:
        return model.get_submodule(parameter.rpartition(".")[0])
    except AttributeError:
        return None


def _expected(model: nn.Module) -> set[tuple[str, str | None]]:
    """Every (parameter, shard) the checkpoint must provide; shard is None for unfused parameters. A parameter
    shared by two modules (a tied lm_head) is expected once, under its first name."""
    canonical = {name for name, _ in model.named_parameters()}
    expected = set()
    for module_name, module in model.named_modules():
        shards = getattr(module, "shard_offsets", None) or [None]
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if name in canonical:
                expected.update((name, shard) for shard in shards)
    return expected


def fill_random(model: nn.Module, seed: int) -> None:
    """Weights for ``load_format="dummy"``: uniform in [-1e-3, 1e-3] as vLLM's dummy format draws them; speed
    does not depend on the values when generation ignores EOS."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for param in model.parameters():   # drawn where the parameter lives: fast for a GPU's billions
            if param.device not in generators:
                generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.uniform_(-1e-3, 1e-3, generator=generators[param.device])
