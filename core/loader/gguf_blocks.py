"""GGUF tensor types: the ones kvserve reads (dequantized with the gguf package's own ``dequantize``), and the
blocks that quantization="gguf" keeps as stored because they map exactly onto a grouped weight-only scheme: 32
inputs with one float16 scale d (and offset m), as the CPU kernel takes them.

K-quants' sub-block scales are float16 d times a 4- to 8-bit integer, which float16 does not hold exactly (the
kernel's scales are float16): they are dequantized at load under any quantization."""
from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from kvserve.core.quantization import grouped

FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
# weight = d * (q - 8), d * q + m, d * q (signed q), d * (q - 16), d * q + m, d * table[q]
BLOCK_SCHEMES = {QType.Q4_0: grouped.W4A16, QType.Q4_1: grouped.W4A16, QType.Q8_0: grouped.W8A16,
                 QType.Q5_0: grouped.W8A16, QType.Q5_1: grouped.W8A16, QType.IQ4_NL: grouped.W8A16}
K_QUANTS = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)
SUPPORTED_TYPES = FLOAT_TYPES + tuple(BLOCK_SCHEMES) + K_QUANTS
BLOCK_SIZE = 32
# IQ4_NL's table, -127..113, plus the zero point 128: levels 1..241.
IQ4_NL_LEVELS = (np.array(gguf.quants.IQ4_NL.kvalues, dtype=np.int16) + 128).astype(np.uint8)


def check_type(name: str, qtype: QType) -> None:
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF tensor {name!r} has type {qtype.name}, supported: "
                         f"{', '.join(q.name for q in SUPPORTED_TYPES)}")


def dequantize(data: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 weights of ``shape`` from a tensor's data (blocks or floats) as the file stores them."""
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32)).reshape(shape)


def block_levels(data: np.ndarray, qtype: QType, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A tensor of a type in BLOCK_SCHEMES as the scheme's levels ``qweight`` [out, in], float16 ``scale`` and
    either ``offset`` (float16) or ``zero`` (int32) per block [out, in / 32], in exactly the weights the file
    means. Each block starts with d, then (Q4_1, Q5_1) m. Its 4-bit fields are 16 bytes, byte j holding inputs j
    (low nibble) and j + 16; Q5_0 and Q5_1 keep each input's fifth bit, bit j for input j, in the 4 bytes before."""
    out_features, in_features = shape
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))   # the file is mapped read-only
    blocks = blocks.reshape(out_features, in_features // BLOCK_SIZE, -1)
    scale = _float16_at(blocks, 0)
    if qtype == QType.Q8_0:
        levels = (blocks[..., 2:].contiguous().view(torch.int8).short() + 128).to(torch.uint8)
        second = {"zero": _zero_points(scale, 128)}
    elif qtype == QType.Q4_0:
        levels, second = _nibbles(blocks[..., 2:]), {"offset": scale * -8}   # exact: a power of two
    elif qtype == QType.Q4_1:
        levels, second = _nibbles(blocks[..., 4:]), {"offset": _float16_at(blocks, 2)}
    elif qtype == QType.Q5_0:
        levels = _nibbles(blocks[..., 6:]) | _fifth_bits(blocks[..., 2:6])
        second = {"zero": _zero_points(scale, 16)}
    elif qtype == QType.Q5_1:
        levels = _nibbles(blocks[..., 8:]) | _fifth_bits(blocks[..., 4:8])
        second = {"offset": _float16_at(blocks, 2)}
    else:   # IQ4_NL; numpy looks uint8 indices up directly, 2-3x faster than torch's int64 ones
        levels = torch.from_numpy(IQ4_NL_LEVELS[_nibbles(blocks[..., 2:]).numpy()])
        second = {"zero": _zero_points(scale, 128)}
    return {"qweight": levels.reshape(out_features, in_features), "scale": scale, **second}


def _zero_points(scale: torch.Tensor, zero: int) -> torch.Tensor:
    return torch.full(scale.shape, zero, dtype=torch.int32)


def _float16_at(blocks: torch.Tensor, byte: int) -> torch.Tensor:
    return blocks[..., byte:byte + 2].contiguous().view(torch.float16)[..., 0]


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def _fifth_bits(word: torch.Tensor) -> torch.Tensor:
    # A little-endian 32-bit word: bit j is bit j % 8 of byte j // 8.
    bits = (word[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten(-2) << 4
