"""Read a llama.cpp GGUF file as a Hugging Face checkpoint: config, float32 weights and tokenizer.

Architectures: llama (Mistral's and Mixtral's files are llama files too) with linear or llama3 rope scaling, qwen2,
qwen2moe, qwen3, qwen3moe, gemma, gemma2, phi3 (longrope too), gpt2, gptneox, falcon and the bert encoder (its WordPiece
tokenizer too), each as gguf_architectures.FAMILIES reads it;
tensor types: gguf_blocks.SUPPORTED_TYPES. Quantized tensors are dequantized to float32 on
load, except that on request the linear layers' blocks, which a grouped weight-only scheme holds exactly (every
quantized type kvserve reads; the output head's too, a tied head's from the embedding's blocks), stay as they are;
names and layouts follow Hugging Face.
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

from kvserve.core.loader.gguf_architectures import FAMILIES, Family, family_of
from kvserve.core.loader.gguf_blocks import BLOCK_SCHEMES, block_levels, check_type, dequantize
from kvserve.plugins.interfaces import QuantizedWeight

LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")
# Tensors that are config (rope scaling factors), not weights.
CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def load_gguf_config(path: str) -> transformers.PretrainedConfig:
    reader, arch = _model_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    family = family_of(arch, tensors)

    def meta(key: str, default=None):
        return _field(reader, key.format(arch=arch), default)

    hidden_size = meta("{arch}.embedding_length")
    num_heads = meta("{arch}.attention.head_count")
    head_dim = meta("{arch}.attention.key_length", hidden_size // num_heads)
    rope = _rope_parameters(reader, arch)
    rotary_dims = meta("{arch}.rope.dimension_count", head_dim)
    if rotary_dims != head_dim:
        if not family.partial_rotary:
            partial = ", ".join(name for name, other in FAMILIES.items() if other.partial_rotary)
            raise ValueError(f"GGUF {path!r}: {arch}.rope.dimension_count is {rotary_dims}, not the head size "
                             f"{head_dim}: partial rotary embeddings are supported for {partial}, not {arch}")
        rope["partial_rotary_factor"] = rotary_dims / head_dim
    vocab_size = meta("{arch}.vocab_size")
    if vocab_size is None:  # the embedding may be padded past the token list, and the weights must fit
        embed = tensors.get("token_embd.weight")
        vocab_size = int(embed.shape[1]) if embed is not None else len(meta("tokenizer.ggml.tokens", []))
    # GPT-2's and Falcon's converters write 4 x embedding_length, whatever the checkpoint's MLP width.
    down = tensors.get("blk.0.ffn_down.weight")
    common = dict(
        architectures=[family.hf_architecture],
        hidden_size=hidden_size,
        intermediate_size=meta("{arch}.feed_forward_length") if down is None else int(down.shape[0]),
        num_hidden_layers=meta("{arch}.block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=meta("{arch}.attention.head_count_kv", num_heads),
        head_dim=head_dim,
        vocab_size=vocab_size,
        max_position_embeddings=meta("{arch}.context_length"),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta("tokenizer.ggml.padding_token_id"),
        dtype=torch.float32,
    )
    kwargs = family.config(common, meta, tensors)
    if "rope_freqs.weight" in tensors:
        # llama.cpp stores llama3 rope scaling as the factor dividing each rotary frequency.
        factors = gguf.quants.dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type)
        if factors.size != head_dim // 2:
            raise ValueError(f"GGUF {path!r}: rope_freqs.weight has {factors.size} factors, expected {head_dim // 2}")
        kwargs["rope_freq_factors"] = [float(f) for f in factors.reshape(-1)]
    return family.config_class(**kwargs)


def iter_gguf_weights(path: str, quantized_blocks: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """HF names and float32 tensors (a mixture's stacked experts one by one); with ``quantized_blocks``, the
    linear layers' and the output head's weights of a type in BLOCK_SCHEMES as they are stored (a head tied to the
    embedding as the embedding's blocks, while the embedding itself stays float)."""
    reader, arch = _model_reader(path)
    family = family_of(arch, {t.name for t in reader.tensors})
    num_heads = _field(reader, f"{arch}.attention.head_count")
    num_kv_heads = _field(reader, f"{arch}.attention.head_count_kv", num_heads)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    for t in reader.tensors:
        if t.name in CONFIG_TENSORS:
            continue
        name = _hf_name(t.name, family)
        shape = tuple(int(d) for d in reversed(t.shape))
        if len(shape) == 3:   # experts, stacked: float, as the fused MoE op takes them
            for expert in range(shape[0]):
                yield name.format(expert), dequantize(t.data[expert], t.tensor_type, shape[1:])
            continue
        if name.endswith("shared_expert_gate.weight"):   # llama.cpp drops the single output's dimension
            shape = (1, *shape)
        scheme, group_size = BLOCK_SCHEMES.get(t.tensor_type, (None, None))
        as_blocks = quantized_blocks and scheme is not None
        if as_blocks and tied and t.name == "token_embd.weight" and "output.weight" in family.names:
            yield family.names["output.weight"], QuantizedWeight(
                scheme, block_levels(t.data, t.tensor_type, shape), shape, group_size)
        if as_blocks and name.endswith(family.blocks):
            tensors = block_levels(t.data, t.tensor_type, shape)
        else:
            tensors = {"": dequantize(t.data, t.tensor_type, shape)}
            if family.floats is not None:
                tensors = {"": family.floats(name, tensors[""])}
        if family.rows is not None:   # each row is an output: the same rows of levels and scales move
            tensors = {key: family.rows(name, tensor, num_heads, num_kv_heads) for key, tensor in tensors.items()}
        if "" in tensors:
            yield name, tensors[""]
        else:
            yield name, QuantizedWeight(scheme, tensors, shape, group_size)


def load_gguf_tokenizer(path: str):
    """The file's tokenizer; converted by transformers once, then loaded from kvserve's cache folder."""
    _check_file(path)
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("KVSERVE_CACHE_DIR", os.path.expanduser("~/.cache/kvserve")),
                         "gguf-tokenizers", key)
    if os.path.isfile(os.path.join(cache, "tokenizer_config.json")):
        return transformers.AutoTokenizer.from_pretrained(cache)
    if _field(_open(path), "tokenizer.ggml.model") == "bert":   # transformers reads no WordPiece vocabulary
        tokenizer = _wordpiece_tokenizer(_open(path))
        tokenizer.save_pretrained(cache)
        return tokenizer
    # transformers' AutoTokenizer reads the file's config first, which it cannot for gemma's and gptneox's: theirs is
    # built from the file's vocabulary alone.
    vocabulary_only = _field(_open(path), "general.architecture") in ("gemma", "gptneox")
    tokenizer_class = transformers.PreTrainedTokenizerFast if vocabulary_only else transformers.AutoTokenizer
    tokenizer = tokenizer_class.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                gguf_file=os.path.basename(path))
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _field(_open(path), "tokenizer.chat_template")
    tokenizer.save_pretrained(cache)
    return tokenizer


def _wordpiece_tokenizer(reader: gguf.GGUFReader) -> transformers.BertTokenizer:
    """A BERT file's WordPiece tokenizer. llama.cpp's converter marks a word's first piece with a leading \u2581
    where BERT marks the others with ##, and leaves control tokens as they are; its tokenizer lowercases and strips
    accents unless the file says otherwise."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    kinds = _field(reader, "tokenizer.ggml.token_type")
    words = [token if kind == gguf.TokenType.CONTROL else token[1:] if token.startswith("\u2581") else "##" + token
             for token, kind in zip(tokens, kinds)]
    special = {}
    for name, keys in (("unk_token", ("unknown",)), ("sep_token", ("seperator", "eos")), ("pad_token", ("padding",)),
                       ("cls_token", ("bos",)), ("mask_token", ("mask",))):
        index = next((i for key in keys if (i := _field(reader, f"tokenizer.ggml.{key}_token_id")) is not None), None)
        if index is not None:
            special[name] = words[index]
    lowercase = _field(reader, "tokenizer.ggml.normalizer.lowercase", True)
    strip_accents = _field(reader, "tokenizer.ggml.normalizer.strip_accents", lowercase)
    return transformers.BertTokenizer(vocab={word: i for i, word in enumerate(words)}, do_lower_case=lowercase,
                                      strip_accents=strip_accents, **special)


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path!r} is not a GGUF file (bad magic number)")


class _Reader(gguf.GGUFReader):
    """gguf-py slices its np.memmap once per metadata value, and memmap's __array_finalize__ runs on every slice:
    a tokenizer's 100,000 strings took 1.9 s. Slices of a plain ndarray over the same mapping take 0.65 s."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, mapped: np.memmap) -> None:
        self._data = mapped.view(np.ndarray)


@functools.lru_cache(maxsize=2)   # config and weights share one reader
def _open(path: str) -> gguf.GGUFReader:
    _check_file(path)
    return _Reader(path)


def _model_reader(path: str) -> tuple[gguf.GGUFReader, str]:
    """The file's reader and architecture, once both the architecture and every tensor's type are supported."""
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in FAMILIES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported, supported: {', '.join(FAMILIES)}")
    for t in reader.tensors:
        check_type(t.name, t.tensor_type)
    return reader, arch


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
    elif kind == "yarn":
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if factor is None or original is None:
            raise ValueError(f"GGUF yarn rope scaling needs {arch}.rope.scaling.factor and "
                             f"{arch}.rope.scaling.original_context_length; the file lacks one")
        params.update(rope_type="yarn", factor=float(factor), original_max_position_embeddings=int(original),
                      **_yarn_options(reader, arch))
    elif kind not in (None, "none", "linear"):
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported, supported: none, linear, yarn")
    return params


def _yarn_options(reader: gguf.GGUFReader, arch: str) -> dict:
    """The transformers yarn fields llama.cpp's converter writes (attention_factor as yarn_attn_factor)."""
    options = {}
    for key, name in (("yarn_attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                      ("yarn_beta_slow", "beta_slow")):
        if (value := _field(reader, f"{arch}.rope.scaling.{key}")) is not None:
            options[name] = float(value)
    for key, neutral in (("yarn_ext_factor", 1.0), ("yarn_log_multiplier", 0.0)):
        if _field(reader, f"{arch}.rope.scaling.{key}", neutral) != neutral:
            raise ValueError(f"GGUF yarn rope scaling with {arch}.rope.scaling.{key} other than {neutral} has no "
                             f"transformers equivalent; supported: {key} absent or {neutral}")
    return options


def _hf_name(name: str, family: Family) -> str:
    if name in family.names:
        return family.names[name]
    match = LAYER_PATTERN.fullmatch(name)
    if match and match[2] in family.layers:
        return f"{family.prefix}{match[1]}.{family.layers[match[2]]}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face equivalent")
