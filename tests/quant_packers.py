"""GPTQ and AWQ checkpoints written here, as AutoGPTQ / GPTQModel and AutoAWQ lay them out (neither installs on a
CPU-only machine): weights rounded to the nearest of 2^b levels per group with integer zero points, then packed
32 / b b-bit values to an int32 by the documented layouts.

- GPTQ ("gptq" checkpoint format, 4 or 8 bits): ``qweight[i, o]`` holds input (32 / b) i + j of output o in bits
  b j..b j + b - 1; ``qzeros[g, i]`` holds output (32 / b) i + j's zero point minus one likewise; ``scales``
  [groups, out] float16; ``g_idx`` [in] each input's group (a permutation of the groups with desc_act).
- AWQ (GEMM): ``qweight[k, i]`` holds output 8i + (0, 2, 4, 6, 1, 3, 5, 7)[j] of input k in bits 4j..4j+3;
  ``qzeros`` the zero points likewise; ``scales`` [groups, out] float16; no g_idx.
"""
from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

GROUP_SIZE = 32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FORMATS = {   # name -> (quant_method, desc_act, bits, group_size: -1 for one group of all inputs)
    "gptq": ("gptq", False, 4, GROUP_SIZE),
    "gptq-desc-act": ("gptq", True, 4, GROUP_SIZE),
    "gptq-8bit-desc-act": ("gptq", True, 8, GROUP_SIZE),
    "gptq-per-channel": ("gptq", False, 4, -1),
    "awq": ("awq", False, 4, GROUP_SIZE),
}


def round_to_levels(weight: torch.Tensor, g_idx: torch.Tensor, bits: int):
    """(levels [out, in], zero [out, groups], scale [out, groups] float16): each group from its min to its max,
    zero points kept in 1..2^bits - 1 (GPTQ's format stores zero - 1 and has no room for -1)."""
    top = (1 << bits) - 1
    out_features, in_features = weight.shape
    groups = int(g_idx.max()) + 1
    zero = torch.empty(out_features, groups)
    scale = torch.empty(out_features, groups, dtype=torch.float16)
    levels = torch.empty(out_features, in_features)
    for g in range(groups):
        members = g_idx == g
        w = weight[:, members].float()
        low, high = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale[:, g] = ((high - low) / top).clamp(min=1e-4).half()
        step = scale[:, g].float()[:, None]
        zero[:, g] = torch.round(-low / step[:, 0]).clamp(1, top)
        levels[:, members] = torch.round(w / step + zero[:, g:g + 1]).clamp(0, top)
    return levels.to(torch.uint8), zero.to(torch.uint8), scale


def dequantized(levels, zero, scale, g_idx) -> torch.Tensor:
    return (levels.float() - zero.float()[:, g_idx]) * scale.float()[:, g_idx]


def group_indices(in_features: int, desc_act: bool, seed: int, group_size: int) -> torch.Tensor:
    """Each input's group; with desc_act the inputs of a group are scattered (GPTQ's act-order)."""
    g_idx = torch.arange(in_features) // (in_features if group_size == -1 else group_size)
    if desc_act:
        g_idx = g_idx[torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))]
    return g_idx


def pack_words(values: np.ndarray, bits: int = 4) -> np.ndarray:
    """[..., 32 / bits] values -> [...] int32, value j in bits ``bits * j`` on."""
    words = np.zeros(values.shape[:-1], np.uint32)
    for j in range(32 // bits):
        words |= values[..., j].astype(np.uint32) << np.uint32(bits * j)
    return words.view(np.int32)


def pack_gptq(levels, zero, scale, g_idx, bits: int = 4) -> dict[str, torch.Tensor]:
    (out_features, in_features), per_word = levels.shape, 32 // bits
    by_input = levels.numpy().T.reshape(in_features // per_word, per_word, out_features).transpose(0, 2, 1)
    zeros_minus_one = (zero.numpy().T.astype(np.int64) - 1).reshape(zero.shape[1], out_features // per_word, per_word)
    return {"qweight": torch.from_numpy(pack_words(by_input, bits)),
            "qzeros": torch.from_numpy(pack_words(zeros_minus_one, bits)), "scales": scale.T.contiguous(),
            "g_idx": g_idx.int()}


def pack_awq(levels, zero, scale) -> dict[str, torch.Tensor]:
    def by_output(values: np.ndarray) -> np.ndarray:   # [rows, out] -> words [rows, out / 8]
        return pack_words(values.reshape(values.shape[0], -1, 8)[..., list(AWQ_ORDER)])

    return {"qweight": torch.from_numpy(by_output(levels.numpy().T)),
            "qzeros": torch.from_numpy(by_output(zero.numpy().T)), "scales": scale.T.contiguous()}


def quantized_layers(path: str, name: str):
    """{layer: (levels, zero, scale, g_idx)} for every linear layer of a tiny checkpoint but its head. Layers that
    share their input share its order (as GPTQ's act-order, from the input's statistics, gives them)."""
    _, desc_act, bits, group_size = FORMATS[name]
    layers = {}
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        for tensor_name in sorted(f.keys()):
            if tensor_name.endswith("_proj.weight"):
                weight = f.get_tensor(tensor_name)
                same_input = re.sub(r"\.(q|k|v)_proj\.", ".qkv.", tensor_name)
                same_input = re.sub(r"\.(gate|up)_proj\.", ".gate_up.", same_input)
                g_idx = group_indices(weight.shape[1], desc_act, zlib.crc32(same_input.encode()), group_size)
                layers[tensor_name.removesuffix(".weight")] = (*round_to_levels(weight, g_idx, bits), g_idx)
    return layers


def write_checkpoint(path: str, name: str, destination: Path) -> str:
    """A copy of the checkpoint at ``path`` whose linear layers (the head aside) are in format ``name``."""
    method, desc_act, bits, group_size = FORMATS[name]
    layers = quantized_layers(path, name)
    tensors = {}
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        for tensor_name in f.keys():
            layer = tensor_name.removesuffix(".weight")
            if layer not in layers:
                tensors[tensor_name] = f.get_tensor(tensor_name)
                continue
            levels, zero, scale, g_idx = layers[layer]
            packed = (pack_gptq(levels, zero, scale, g_idx, bits) if method == "gptq" else
                      pack_awq(levels, zero, scale))
            tensors.update({f"{layer}.{part}": value for part, value in packed.items()})
    shutil.copytree(path, destination, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(tensors, str(destination / "model.safetensors"))
    config = json.loads((destination / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                      "desc_act": desc_act, "sym": False, "checkpoint_format": "gptq"}
                                     if method == "gptq" else
                                     {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                      "version": "gemm"})
    (destination / "config.json").write_text(json.dumps(config))
    return str(destination)
