"""GGUF tensor types: the ones kvserve reads (dequantized with the gguf package's own ``dequantize``), and how
quantization="gguf" keeps their blocks as stored: each maps exactly onto a grouped weight-only scheme, as the CPU
kernel takes it. The blocks of 32 inputs have one float16 scale d (and offset m); K-quants' blocks of 256 have a
float16 d (and dmin) times an integer sub-scale (and minimum) per 16 or 32 inputs, exact in float32."""
from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf.constants import GGML_QUANT_SIZES

from kvserve.core.quantization import grouped

FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
K_QUANTS = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)
# type: (scheme, inputs per scale). Weights d * (q - 8), d * q + m, d * q (signed q), d * (q - 16), d * q + m,
# d * table[q]; K-quants: d * sc * q - dmin * m (Q2_K, Q4_K, Q5_K) or d * sc * q with signed q (Q3_K, Q6_K).
BLOCK_SCHEMES = {QType.Q4_0: (grouped.W4A16, 32), QType.Q4_1: (grouped.W4A16, 32), QType.Q8_0: (grouped.W8A16, 32),
                 QType.Q5_0: (grouped.W8A16, 32), QType.Q5_1: (grouped.W8A16, 32), QType.IQ4_NL: (grouped.W8A16, 32),
                 QType.Q2_K: (grouped.W4A16, 16), QType.Q3_K: (grouped.W4A16, 16), QType.Q4_K: (grouped.W4A16, 32),
                 QType.Q5_K: (grouped.W8A16, 32), QType.Q6_K: (grouped.W8A16, 16)}
SUPPORTED_TYPES = FLOAT_TYPES + tuple(BLOCK_SCHEMES)
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
    """A tensor of a type in BLOCK_SCHEMES as the scheme's levels ``qweight`` [out, in], ``scale`` and either
    ``offset`` or ``zero`` (int32) per group of inputs [out, groups], in exactly the weights the file means: float16
    scales and offsets for the blocks of 32, float32 for K-quants."""
    out_features, in_features = shape
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))   # the file is mapped read-only
    blocks = blocks.reshape(out_features, in_features // GGML_QUANT_SIZES[qtype][0], -1)
    levels, scale, second = (_k_quant if qtype in K_QUANTS else _block_of_32)(blocks, qtype)
    return {"qweight": levels.reshape(out_features, in_features), "scale": scale.reshape(out_features, -1),
            **{key: value.reshape(out_features, -1) for key, value in second.items()}}


def _block_of_32(blocks: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Each block starts with d, then (Q4_1, Q5_1) m. Its 4-bit fields are 16 bytes, byte j holding inputs j (low
    nibble) and j + 16; Q5_0 and Q5_1 keep each input's fifth bit, bit j for input j, in the 4 bytes before."""
    scale = _float16_at(blocks, 0)
    if qtype == QType.Q8_0:
        levels = (blocks[..., 2:].contiguous().view(torch.int8).short() + 128).to(torch.uint8)
        return levels, scale, {"zero": _zero_points(scale, 128)}
    if qtype == QType.Q4_0:
        return _bit_fields(blocks[..., 2:], 4), scale, {"offset": scale * -8}   # exact: a power of two
    if qtype == QType.Q4_1:
        return _bit_fields(blocks[..., 4:], 4), scale, {"offset": _float16_at(blocks, 2)}
    if qtype == QType.Q5_0:
        levels = _bit_fields(blocks[..., 6:], 4) | _fifth_bits(blocks[..., 2:6])
        return levels, scale, {"zero": _zero_points(scale, 16)}
    if qtype == QType.Q5_1:
        levels = _bit_fields(blocks[..., 8:], 4) | _fifth_bits(blocks[..., 4:8])
        return levels, scale, {"offset": _float16_at(blocks, 2)}
    # IQ4_NL; numpy looks uint8 indices up directly, 2-3x faster than torch's int64 ones
    levels = torch.from_numpy(IQ4_NL_LEVELS[_bit_fields(blocks[..., 2:], 4).numpy()])
    return levels, scale, {"zero": _zero_points(scale, 128)}


def _k_quant(blocks: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A K-quant's blocks of 256 inputs (the fields' byte ranges as ggml's block_q*_K lay them out) as levels
    [..., 256] and float32 scales and offsets, or zero points, per sub-block of 16 or 32 inputs."""
    if qtype == QType.Q2_K:   # 4-bit scales and minimums, 2-bit levels, d, dmin
        sub_scales = blocks[..., :16]
        levels, minimums = _bit_fields(blocks[..., 16:80], 2, run=32), _float16_times(blocks, 82, sub_scales >> 4)
        return levels, _float16_times(blocks, 80, sub_scales & 0xF), {"offset": -minimums}
    if qtype == QType.Q3_K:   # high bits (set for q >= 0), 2-bit levels, 6-bit scales less 32, d
        levels = _bit_fields(blocks[..., 32:96], 2, run=32) | _bit_fields(blocks[..., :32], 1) << 2
        sub_scales = _bit_fields(blocks[..., 96:104], 4) | _bit_fields(blocks[..., 104:108], 2) << 4
        scale = _float16_times(blocks, 108, sub_scales.short() - 32)
        return levels, scale, {"zero": _zero_points(scale, 4)}
    if qtype == QType.Q6_K:   # low nibbles, high 2 bits, int8 scales, d
        levels = _bit_fields(blocks[..., :128], 4, run=64) | _bit_fields(blocks[..., 128:192], 2, run=32) << 4
        scale = _float16_times(blocks, 208, blocks[..., 192:208].contiguous().view(torch.int8))
        return levels, scale, {"zero": _zero_points(scale, 32)}
    # Q4_K, Q5_K: d, dmin, 6-bit scales and minimums, (Q5_K) fifth bits, low nibbles
    levels = _bit_fields(blocks[..., -128:], 4, run=32)
    if qtype == QType.Q5_K:
        levels |= _bit_fields(blocks[..., 16:48], 1) << 4
    packed = blocks[..., 4:16]
    low, high, both = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sub_scales = torch.cat([low & 0x3F, (both & 0xF) | ((low >> 2) & 0x30)], dim=-1)
    minimums = torch.cat([high & 0x3F, (both >> 4) | ((high >> 2) & 0x30)], dim=-1)
    return levels, _float16_times(blocks, 0, sub_scales), {"offset": -_float16_times(blocks, 2, minimums)}


def _zero_points(scale: torch.Tensor, zero: int) -> torch.Tensor:
    return torch.full(scale.shape, zero, dtype=torch.int32)


def _float16_at(blocks: torch.Tensor, byte: int) -> torch.Tensor:
    return blocks[..., byte:byte + 2].contiguous().view(torch.float16)[..., 0]


def _float16_times(blocks: torch.Tensor, byte: int, integers: torch.Tensor) -> torch.Tensor:
    """The float16 at ``byte`` of each block times each of its ``integers``, in float32 as ggml multiplies them."""
    return _float16_at(blocks, byte).float()[..., None] * integers.float()


def _bit_fields(packed: torch.Tensor, bits: int, run: int | None = None) -> torch.Tensor:
    """[..., bytes] -> [..., bytes * 8 / bits]: in each run of ``run`` bytes (default: all), every byte's lowest
    ``bits`` bits, then every byte's next ``bits``, and so on, as ggml spreads consecutive inputs."""
    runs = packed.unflatten(-1, (-1, run or packed.shape[-1]))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)[:, None]
    return ((runs[..., None, :] >> shifts) & ((1 << bits) - 1)).flatten(-3)


def _fifth_bits(word: torch.Tensor) -> torch.Tensor:
    # A little-endian 32-bit word: bit j is bit j % 8 of byte j // 8.
    bits = (word[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten(-2) << 4
