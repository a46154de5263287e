"""Read a PEFT LoRA folder and fit it to the model: every check an adapter must pass happens here, before any
request runs with it."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from kvserve.core.layers.linear import Linear
from kvserve.core.lora.layers import Target, shard_sizes
from kvserve.core.lora.request import LoRARequest

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TENSOR_NAME = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight")
# adapter_config.json entries that change what the adapter computes, with the value kvserve runs
PLAIN_LORA = {"peft_type": "LORA", "use_dora": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
              "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "trainable_token_indices": None}


@dataclass
class LoRAAdapter:
    request: LoRARequest
    rank: int
    # model layer -> {its shard index: (A [rank, in], B [shard size, rank] times the adapter's scale)}
    weights: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]


def read_adapter(request: LoRARequest, targets: dict[str, Target], layers: dict[str, Linear], max_rank: int,
                 dtype: torch.dtype) -> LoRAAdapter:
    """The adapter at ``request.lora_path``, checked against the model's ``targets`` and ``layers``."""
    where = f"LoRA adapter {request.lora_name!r} ({request.lora_path})"
    config, tensors = _read_folder(request.lora_path, where)
    differing = {key: config[key] for key, plain in PLAIN_LORA.items() if config.get(key, plain) not in (plain, None)}
    if differing:
        raise ValueError(f"{where} sets {differing}: kvserve runs plain LoRA only "
                         f"({', '.join(f'{k}={v!r}' for k, v in PLAIN_LORA.items())})")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: adapter_config.json's r must be an integer >= 1, got {rank!r}")
    if rank > max_rank:
        raise ValueError(f"{where} has rank {rank}, above max_lora_rank={max_rank}: start the engine with "
                         f"max_lora_rank >= {rank} (allowed: 1, 8, 16, 32, 64, 128, 256)")
    _check_target_modules(config.get("target_modules"), targets, where)
    alpha = config.get("lora_alpha", 8)
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = TENSOR_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"{where} holds {name!r}, which is not a LoRA A or B weight of a linear layer: "
                             f"only {', '.join(_module_kinds(targets))} take adapters")
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    weights: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, pair in pairs.items():
        target = targets.get(module)
        if target is None:
            raise ValueError(f"{where} adapts {module!r}, which the model has no adaptable layer for; allowed "
                             f"modules: {', '.join(_module_kinds(targets))}")
        if pair.keys() != {"A", "B"}:
            raise ValueError(f"{where} has lora_{''.join(pair)} for {module!r} but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        _check_shapes(module, a, b, layers[target.layer], target, rank, where)
        rows = b.split([shard_sizes(layers[target.layer])[shard] for shard in target.shards])
        for shard, shard_b in zip(target.shards, rows):
            weights.setdefault(target.layer, {})[shard] = (a.to(dtype), (shard_b.float() * scale).to(dtype))
    if not weights:
        raise ValueError(f"{where} holds no LoRA weights")
    return LoRAAdapter(request, rank, weights)


def _read_folder(path: str, where: str) -> tuple[dict, dict[str, torch.Tensor]]:
    if not os.path.isdir(path):
        raise ValueError(f"{where}: no such folder; lora_path must be a PEFT adapter's folder")
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{where} has no adapter_config.json: is it a PEFT LoRA adapter?")
    with open(config_path) as f:
        config = json.load(f)
    for file in WEIGHT_FILES:
        weight_path = os.path.join(path, file)
        if os.path.isfile(weight_path):
            tensors = (load_file(weight_path) if file.endswith(".safetensors")
                       else torch.load(weight_path, map_location="cpu", weights_only=True))
            return config, tensors
    raise ValueError(f"{where} has neither {' nor '.join(WEIGHT_FILES)}")


def _check_target_modules(target_modules, targets: dict[str, Target], where: str) -> None:
    """Each module adapter_config.json targets must name adaptable layers, as PEFT matches names: the whole name
    or its last parts (a list), or a regular expression over whole names (a string; "all-linear")."""
    names = list(targets)
    if isinstance(target_modules, str):
        if target_modules != "all-linear" and not any(re.fullmatch(target_modules, n) for n in names):
            raise ValueError(f"{where} targets modules {target_modules!r}, which match no adaptable layer of the "
                             f"model; allowed modules: {', '.join(_module_kinds(targets))}")
        return
    missing = [t for t in target_modules or () if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"{where} targets modules {missing} that the model does not have or cannot adapt; "
                         f"allowed modules: {', '.join(_module_kinds(targets))}")


def _check_shapes(module: str, a: torch.Tensor, b: torch.Tensor, layer: Linear, target: Target, rank: int,
                  where: str) -> None:
    """A and B of ``module`` must fit the model's layer at the adapter's rank."""
    sizes = shard_sizes(layer)
    outputs = sum(sizes[shard] for shard in target.shards)
    expected = {"A": (rank, layer.in_features), "B": (outputs, rank)}
    for part, tensor in (("A", a), ("B", b)):
        if tuple(tensor.shape) != expected[part]:
            raise ValueError(f"{where} does not fit the base model: {module}'s lora_{part} has shape "
                             f"{tuple(tensor.shape)}, the model's layer needs {expected[part]} at rank {rank}; "
                             f"was it trained on another base model?")


def _module_kinds(targets: dict[str, Target]) -> list[str]:
    """The adaptable modules' own names (q_proj, down_proj, ...), as adapter_config.json lists them."""
    return sorted({name.rpartition(".")[2] for name in targets})
