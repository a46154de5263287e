"""Tiny GGUF files written the way llama.cpp writes them, for the GGUF loader's tests."""
from __future__ import annotations

import json

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf.constants import GGML_QUANT_SIZES
from transformers import PreTrainedTokenizerFast

# A tiny model: 4 heads of 16 dims, 2 kv heads, one layer.
HIDDEN, FFN, VOCAB, HEADS, KV_HEADS = 64, 128, 32, 4, 2

# Each block's float16 d by byte, the largest integer it multiplies (with |d| up to 0.1 / that, the weights stay
# below about 0.1), and the minimum's float16 field (m or dmin) with its ratio to d that centres the weights: a
# model whose rows share one positive bias keeps choosing the same token.
FLOAT16_FIELDS = {QType.Q2_K: (80, 45, (82, 1.5)), QType.Q3_K: (108, 128, None), QType.Q4_K: (0, 945, (2, 7.5)),
                  QType.Q5_K: (0, 1953, (2, 15.5)), QType.Q6_K: (208, 4096, None), QType.Q5_0: (0, 16, None),
                  QType.Q5_1: (0, 31, (2, -15.5)), QType.IQ4_NL: (0, 127, None)}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch="llama", tensors=None, extra=lambda writer: None, hidden=HIDDEN, ffn=FFN, heads=HEADS,
               kv_heads=KV_HEADS, layers=1) -> str:
    """tensors: gguf name -> (float array in the GGUF layout, type), or raw uint8 blocks for an exotic type."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(50000.0)
    extra(writer)
    return write_tensors(writer, tensors or {})


def write_tensors(writer: gguf.GGUFWriter, tensors: dict) -> str:
    """Adds ``tensors`` as write_gguf takes them to a writer holding its metadata, writes the file, returns its path."""
    for name, (array, qtype) in tensors.items():
        data = array if array.dtype == np.uint8 else gguf.quants.quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(writer.path)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerFast, chat_template: str) -> None:
    """A byte-level BPE tokenizer's vocabulary, merges and special tokens, as llama.cpp's converter stores them."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(chat_template)


def random_blocks(rng: np.random.Generator, qtype: QType, shape: tuple[int, ...]) -> np.ndarray:
    """Valid blocks of ``qtype`` for weights of ``shape``: random bytes but for finite, modest float16 fields."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // block_size, type_size), dtype=np.uint8)
    d_byte, largest, minimum = FLOAT16_FIELDS[qtype]
    d = rng.uniform(0.5, 1, blocks.shape[:-1]) * rng.choice([-1, 1], blocks.shape[:-1]) * 0.1 / largest
    fields = [(d_byte, d)] if minimum is None else [(d_byte, d), (minimum[0], d * minimum[1])]
    for byte, value in fields:
        blocks[..., byte:byte + 2] = value.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(*shape[:-1], -1)
