"""POST /v1/embeddings on a real `kvserve serve --runner pooling` process (no model: the default embedding model,
all-MiniLM-L6-v2), driven by the official openai client: float and base64 embeddings equal LLM.embed's, usage
counts the prompt tokens, and bad requests, or requests for the other kind of model, get OpenAI's 400s."""
from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
from server_utils import assert_error, openai_client, post, start_server, stop_server, tiny_args

from kvserve import LLM

pytestmark = pytest.mark.slow

NAME = "all-MiniLM-L6-v2"
TEXTS = ["A man is eating food.", "Hi",
         "The quick brown fox jumps over the lazy dog, then naps for a long time under the old oak tree."]


@pytest.fixture(scope="module")
def server():
    server = start_server(["--runner", "pooling", "--dtype", "float32"])
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(runner="pooling", dtype="float32")   # as the server runs


def test_float_and_base64_embeddings_equal_llm_embed(server, llm):
    expected = [o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)]
    client = openai_client(server)
    assert [m.id for m in client.models.list().data] == [NAME]
    as_floats = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    as_base64 = client.embeddings.create(model=NAME, input=TEXTS)   # the client asks for base64, and decodes it
    for result in (as_floats, as_base64):
        assert result.object == "list" and result.model == NAME
        assert [(d.object, d.index) for d in result.data] == [("embedding", i) for i in range(len(TEXTS))]
        np.testing.assert_allclose([d.embedding for d in result.data], expected, rtol=0, atol=1e-6)
    raw = post(server, "/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"}).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]]
    assert [d.tolist() for d in decoded] == [np.float32(d.embedding).tolist() for d in as_floats.data]


def test_usage_counts_the_prompt_tokens_of_texts_and_token_ids(server, llm):
    ids = [llm.get_tokenizer()(text)["input_ids"] for text in TEXTS]
    client = openai_client(server)
    by_text = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    for given, prompts in ((TEXTS, ids), (ids, ids), (ids[2], ids[2:]), (TEXTS[1], ids[1:2])):
        result = client.embeddings.create(model=NAME, input=given, encoding_format="float")
        assert result.usage.prompt_tokens == result.usage.total_tokens == sum(map(len, prompts))
        firsts = [ids.index(p) for p in prompts]
        np.testing.assert_allclose([d.embedding for d in result.data],
                                   [by_text.data[i].embedding for i in firsts], rtol=0, atol=1e-6)


def test_bad_requests_get_openai_400s(server):
    longest = [101] + [2000] * 510 + [102]
    for body, param, message in (
            ({"input": []}, "input", "input is empty"),
            ({"input": ["Hi", ""]}, "input", "prompt is empty"),
            ({"input": [longest + [102]]}, "input", "the prompt may have at most 512 tokens"),
            ({"input": "Hi", "dimensions": 8}, "dimensions", f'model "{NAME}" does not support matryoshka'),
            ({"input": "Hi", "encoding_format": "int8"}, "encoding_format", "base64"),
            ({"input": "Hi", "model": "other"}, "model", "does not exist")):
        assert_error(post(server, "/v1/embeddings", body), 404 if param == "model" else 400, param, message)
    assert post(server, "/v1/embeddings", {"input": [longest]}).status_code == 200
    client = openai_client(server)
    with pytest.raises(openai.BadRequestError, match="does not support matryoshka"):
        client.embeddings.create(model=NAME, input="Hi", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}])


def test_a_generative_model_refuses_embeddings(tiny_model):
    server = start_server(tiny_args(tiny_model))
    try:
        assert_error(post(server, "/v1/embeddings", {"input": "Hi"}), 400, None, "embeddings need a pooling model")
    finally:
        stop_server(server)
