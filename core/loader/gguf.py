"""Read a llama.cpp GGUF file as a Hugging Face checkpoint: config, float32 weights and tokenizer.

Only dense Llama (with linear or llama3 rope scaling) and Qwen2 models are supported, with F32, F16, BF16, Q4_0,
Q4_1 and Q8_0 tensors.
Quantized tensors are dequantized to float32 on load, except that on request the linear layers' Q4_0, Q4_1 and
Q8_0 blocks (the output head's too, a tied head's from the embedding's blocks) become int4 / int8 weight-only
weights as they are; names and layouts follow Hugging Face.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from typing import Iterator

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType as QType

from kvserve.core.quantization import grouped
from kvserve.plugins.interfaces import QuantizedWeight

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, "LlamaForCausalLM"),
    "qwen2": (transformers.Qwen2Config, "Qwen2ForCausalLM"),
}
SUPPORTED_TYPES = (QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q8_0)
BLOCK_TYPES = {QType.Q4_0: grouped.W4A16, QType.Q4_1: grouped.W4A16, QType.Q8_0: grouped.W8A16}
BLOCK_SIZE = 32   # inputs in a Q4_0, Q4_1 or Q8_0 block

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn_{g}.{p}": f"self_attn.{h}_proj.{p}"
       for g, h in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for p in ("weight", "bias")},
    **{f"ffn_{g}.weight": f"mlp.{g}_proj.weight" for g in ("gate", "up", "down")},
}
LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")


def load_gguf_config(path: str) -> transformers.PretrainedConfig:
    reader = _open(path)
    arch = _arch(reader)
    config_cls, hf_arch = ARCHITECTURES[arch]

    def meta(key: str, default=None):
        return _field(reader, key.format(arch=arch), default)

    tensors = {t.name: t for t in reader.tensors}

    hidden_size = meta("{arch}.embedding_length")
    num_heads = meta("{arch}.attention.head_count")
    head_dim = meta("{arch}.attention.key_length", hidden_size // num_heads)
    if meta("{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"GGUF {path!r}: partial rotary embeddings are not supported")
    vocab_size = meta("{arch}.vocab_size")
    if vocab_size is None:  # the embedding may be padded past the token list, and the weights must fit
        embed = tensors.get("token_embd.weight")
        vocab_size = int(embed.shape[1]) if embed is not None else len(meta("tokenizer.ggml.tokens", []))
    kwargs = dict(
        architectures=[hf_arch],
        hidden_size=hidden_size,
        intermediate_size=meta("{arch}.feed_forward_length"),
        num_hidden_layers=meta("{arch}.block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=meta("{arch}.attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=meta("{arch}.attention.layer_norm_rms_epsilon"),
        vocab_size=vocab_size,
        max_position_embeddings=meta("{arch}.context_length"),
        rope_parameters=_rope_parameters(reader, arch),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta("tokenizer.ggml.padding_token_id"),
        dtype=torch.float32,
    )
    if arch == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if "rope_freqs.weight" in tensors:
        # llama.cpp stores llama3 rope scaling as the factor dividing each rotary frequency.
        factors = gguf.quants.dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type)
        if factors.size != head_dim // 2:
            raise ValueError(f"GGUF {path!r}: rope_freqs.weight has {factors.size} factors, expected {head_dim // 2}")
        kwargs["rope_freq_factors"] = [float(f) for f in factors.reshape(-1)]
    return config_cls(**kwargs)


def iter_gguf_weights(path: str, quantized_blocks: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """HF names and float32 tensors; with ``quantized_blocks``, the linear layers' and the output head's Q4_0,
    Q4_1 and Q8_0 weights as they are stored (a head tied to the embedding as the embedding's blocks, while the
    embedding itself stays float)."""
    reader = _open(path)
    arch = _arch(reader)
    num_heads = _field(reader, f"{arch}.attention.head_count")
    num_kv_heads = _field(reader, f"{arch}.attention.head_count_kv", num_heads)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":   # part of the config (rope_freq_factors), not a weight
            continue
        name = _hf_name(t.name)
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(f"GGUF tensor {t.name!r} has type {t.tensor_type.name}, supported: "
                             f"{', '.join(q.name for q in SUPPORTED_TYPES)}")
        shape = tuple(int(d) for d in reversed(t.shape))
        as_blocks = quantized_blocks and t.tensor_type in BLOCK_TYPES
        if as_blocks and tied and name == "model.embed_tokens.weight":
            yield "lm_head.weight", QuantizedWeight(BLOCK_TYPES[t.tensor_type], block_levels(t.data, t.tensor_type,
                                                                                            shape), shape, BLOCK_SIZE)
        if as_blocks and name.endswith(("_proj.weight", "lm_head.weight")):
            tensors = block_levels(t.data, t.tensor_type, shape)
        else:
            tensors = {"": torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
                       .reshape(shape)}
        # llama.cpp interleaves the rotary halves of each q/k head for llama; HF uses rotate_half. Each row is
        # an output, so the same rows of levels, scales and offsets move.
        heads = {".q_proj.": num_heads, ".k_proj.": num_kv_heads}
        for part, n_head in heads.items():
            if arch == "llama" and part in name:
                tensors = {key: _unpermute(tensor, n_head) for key, tensor in tensors.items()}
        if "" in tensors:
            yield name, tensors[""]
        else:
            yield name, QuantizedWeight(BLOCK_TYPES[t.tensor_type], tensors, shape, BLOCK_SIZE)


def block_levels(data: np.ndarray, qtype: QType, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A Q4_0, Q4_1 or Q8_0 tensor's blocks of 32 inputs as levels, scales and offsets. Each starts with a float16
    scale d. A Q4_1 block has a float16 minimum m, then 16 bytes of levels (weight = d * level + m), a Q4_0 block
    the 16 bytes (weight = d * (level - 8)); byte j holds inputs j (low nibble) and j + 16 (high nibble). A Q8_0
    block has 32 signed bytes q (weight = d * q, here the level q + 128 less the zero point 128)."""
    out_features, in_features = shape
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))   # the file is mapped read-only
    blocks = blocks.reshape(out_features, in_features // BLOCK_SIZE, -1)
    scale = blocks[..., :2].contiguous().view(torch.float16)[..., 0]
    if qtype == QType.Q8_0:
        levels = (blocks[..., 2:].contiguous().view(torch.int8).int() + 128).to(torch.uint8)
        return {"qweight": levels.reshape(out_features, in_features), "scale": scale,
                "zero": torch.full(scale.shape, 128, dtype=torch.int32)}
    if qtype == QType.Q4_1:
        offset, levels = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0], blocks[..., 4:]
    else:
        offset, levels = scale * -8, blocks[..., 2:]   # exact: a power of two
    qweight = torch.cat([levels & 0xF, levels >> 4], dim=-1).reshape(out_features, in_features)
    return {"qweight": qweight, "scale": scale, "offset": offset}


def load_gguf_tokenizer(path: str):
    """The file's tokenizer; converted by transformers once, then loaded from kvserve's cache folder."""
    _check_file(path)
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("KVSERVE_CACHE_DIR", os.path.expanduser("~/.cache/kvserve")),
                         "gguf-tokenizers", key)
    if os.path.isfile(os.path.join(cache, "tokenizer_config.json")):
        return transformers.AutoTokenizer.from_pretrained(cache)
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                           gguf_file=os.path.basename(path))
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _field(_open(path), "tokenizer.chat_template")
    tokenizer.save_pretrained(cache)
    return tokenizer


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path!r} is not a GGUF file (bad magic number)")


@functools.lru_cache(maxsize=2)   # parsing the metadata takes seconds; config and weights share one reader
def _open(path: str) -> gguf.GGUFReader:
    _check_file(path)
    return gguf.GGUFReader(path)


def _arch(reader: gguf.GGUFReader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported, supported: {', '.join(ARCHITECTURES)}")
    return arch


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _rope_parameters(reader: gguf.GGUFReader, arch: str) -> dict:
    params = {"rope_type": "default", "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0)}
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind is None and _field(reader, f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", _field(reader, f"{arch}.rope.scale_linear")  # older converters
    if kind == "linear" and factor not in (None, 1.0):
        params.update(rope_type="linear", factor=float(factor))
    elif kind not in (None, "none", "linear"):
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported, supported: none, linear")
    return params


def _hf_name(name: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    match = LAYER_PATTERN.fullmatch(name)
    if match and match[2] in LAYER_NAMES:
        return f"model.layers.{match[1]}.{LAYER_NAMES[match[2]]}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face equivalent")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # Inverse of convert_hf_to_gguf.py's permute: reshape(n_head, 2, d/2, ...).swapaxes(1, 2).
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
