"""The OpenAI-compatible server on the default model, driven by the official openai client."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from server_utils import DEFAULT_NAME, metrics, post, start_server, stop_server, token_count

import kvserve
from kvserve.core.sampling_params import SamplingParams

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    server = start_server(["--max-model-len", "1024", "--kv-cache-memory", "256MiB", "--dtype", "float32"])
    yield server
    stop_server(server)


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def llm():
    from kvserve.core.entrypoints.llm import LLM
    return LLM(max_model_len=1024, kv_cache_memory="256MiB", dtype="float32")   # as the server runs


def complete(client, **kwargs):
    return client.completions.create(model=DEFAULT_NAME, **{"temperature": 0, **kwargs})


def chat(client, **kwargs):
    return client.chat.completions.create(model=DEFAULT_NAME, **{"messages": MESSAGES, "temperature": 0, **kwargs})


def test_models_version_and_health(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json() == {"version": kvserve.__version__}
    assert [m.id for m in client.models.list().data] == [DEFAULT_NAME]


def test_completion_usage_is_exact(server, client):
    result = complete(client, prompt=PROMPT, max_tokens=7, extra_body=IGNORE_EOS)
    assert result.object == "text_completion" and result.model == DEFAULT_NAME
    assert [c.index for c in result.choices] == [0] and result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == token_count(server, prompt=PROMPT)
    assert result.usage.completion_tokens == 7
    assert result.usage.total_tokens == result.usage.prompt_tokens + 7


def check_completion_stream(chunks, expected):
    """Text chunks, then a usage chunk with no choices; the stream's text and usage equal ``expected``'s."""
    *texts, last = chunks
    assert last.choices == [] and last.usage == expected.usage
    assert all(c.usage is None and len(c.choices) == 1 and c.choices[0].index == 0 for c in texts)
    assert [c.choices[0].finish_reason for c in texts] == [None] * (len(texts) - 1) + ["length"]
    assert "".join(c.choices[0].text for c in texts) == expected.choices[0].text


def test_completion_stream_equals_non_streaming(server, client):
    kwargs = dict(prompt=PROMPT, max_tokens=12, extra_body=IGNORE_EOS)
    expected = complete(client, **kwargs)
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}, **kwargs))
    check_completion_stream(chunks, expected)

    async def stream_async():
        async with async_client(server) as aclient:
            stream = await aclient.completions.create(model=DEFAULT_NAME, temperature=0, stream=True,
                                                      stream_options={"include_usage": True}, **kwargs)
            return [chunk async for chunk in stream]

    check_completion_stream(asyncio.run(stream_async()), expected)


def check_chat_stream(chunks, expected):
    *deltas, last = chunks
    assert last.choices == [] and last.usage == expected.usage
    assert deltas[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.choices[0].index == 0 for c in deltas)
    reasons = [c.choices[0].finish_reason for c in deltas]
    assert reasons == [None] * (len(deltas) - 1) + ["length"]
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == expected.choices[0].message.content


def test_chat_usage_and_streaming(server, client):
    expected = chat(client, max_tokens=9, extra_body=IGNORE_EOS)
    assert expected.object == "chat.completion" and expected.choices[0].message.role == "assistant"
    assert expected.choices[0].finish_reason == "length"
    assert expected.usage.prompt_tokens == token_count(server, messages=MESSAGES)
    assert expected.usage.completion_tokens == 9
    assert expected.usage.total_tokens == expected.usage.prompt_tokens + 9
    options = dict(max_tokens=9, extra_body=IGNORE_EOS, stream=True, stream_options={"include_usage": True})
    check_chat_stream(list(chat(client, **options)), expected)

    async def stream_async():
        async with async_client(server) as aclient:
            stream = await aclient.chat.completions.create(model=DEFAULT_NAME, messages=MESSAGES, temperature=0,
                                                           **options)
            return [chunk async for chunk in stream]

    check_chat_stream(asyncio.run(stream_async()), expected)


def test_n_choices_and_seeds(client):
    kwargs = dict(prompt=PROMPT, n=3, max_tokens=8, temperature=1.0, seed=1234, extra_body=IGNORE_EOS)
    first, again = complete(client, **kwargs), complete(client, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 24
    replies = chat(client, n=2, max_tokens=6, temperature=1.0, seed=7)
    assert [c.index for c in replies.choices] == [0, 1]
    assert [c.message.content for c in replies.choices] == \
        [c.message.content for c in chat(client, n=2, max_tokens=6, temperature=1.0, seed=7).choices]


def test_stop_string_truncates(client):
    full = complete(client, prompt=PROMPT, max_tokens=16, extra_body=IGNORE_EOS).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    result = complete(client, prompt=PROMPT, max_tokens=16, stop=[stop, "@@never@@"]).choices[0]
    assert result.text == full[:full.index(stop)]
    assert result.finish_reason == "stop" and result.model_extra["stop_reason"] == stop
    streamed = complete(client, prompt=PROMPT, max_tokens=16, stop=stop, stream=True)
    chunks = [c.choices[0] for c in streamed]
    assert "".join(c.text for c in chunks) == result.text and chunks[-1].finish_reason == "stop"


def test_greedy_equals_offline_llm(client, llm):
    params = SamplingParams(temperature=0, max_tokens=16)
    assert complete(client, prompt=PROMPT, max_tokens=16).choices[0].text == \
        llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].text
    assert chat(client, max_tokens=16).choices[0].message.content == \
        llm.chat(MESSAGES, params, use_tqdm=False)[0].outputs[0].text


def test_logprobs_of_greedy_replies(client):
    reply = chat(client, max_tokens=6, logprobs=True, top_logprobs=3).choices[0]
    content = reply.logprobs.content
    assert reply.finish_reason == "length" and len(content) == 6
    assert "".join(c.token for c in content) == reply.message.content
    for item in content:   # greedy on raw logits: each token is its position's most likely one
        assert [t.token for t in item.top_logprobs][0] == item.token and len(item.top_logprobs) == 3
        assert item.logprob == item.top_logprobs[0].logprob <= 0
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob
    echoed = complete(client, prompt=PROMPT, max_tokens=6, echo=True, logprobs=2, extra_body=IGNORE_EOS).choices[0]
    logprobs = echoed.logprobs
    assert "".join(logprobs.tokens) == echoed.text and logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]


def test_prompt_forms_and_echo(server, client):
    prompts = [PROMPT, "Once upon a time"]
    alone = [complete(client, prompt=p, max_tokens=6).choices[0].text for p in prompts]
    ids = [post(server, "/tokenize", {"prompt": p}).json()["tokens"] for p in prompts]
    many = complete(client, prompt=prompts, max_tokens=6)
    assert [(c.index, c.text) for c in many.choices] == [(0, alone[0]), (1, alone[1])]
    assert many.usage.prompt_tokens == sum(map(len, ids))
    assert complete(client, prompt=ids[0], max_tokens=6).choices[0].text == alone[0]
    batch = complete(client, prompt=ids, max_tokens=6)
    assert [(c.index, c.text) for c in batch.choices] == [(0, alone[0]), (1, alone[1])]
    assert complete(client, prompt=PROMPT, max_tokens=6, echo=True).choices[0].text == PROMPT + alone[0]
    assert complete(client, prompt=ids[1], max_tokens=6, echo=True).choices[0].text == prompts[1] + alone[1]
    streamed = complete(client, prompt=PROMPT, max_tokens=6, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + alone[0]


def test_concurrent_requests(server, client):
    # The server runs float32: in bfloat16 batching 16 requests together legitimately changes their rounding.
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(16)]
    alone = [complete(client, prompt=p, max_tokens=6).choices[0].text for p in prompts]

    async def all_at_once():
        async with async_client(server) as aclient:
            results = await asyncio.gather(*[aclient.completions.create(
                model=DEFAULT_NAME, prompt=p, max_tokens=6, temperature=0) for p in prompts])
        return [r.choices[0].text for r in results]

    assert asyncio.run(all_at_once()) == alone


def test_tokenize_detokenize_round_trip(server):
    text = "Paged attention stores keys and values in blocks. déjà vu 🙂"
    tokens = post(server, "/tokenize", {"prompt": text}).json()
    assert tokens["max_model_len"] == 1024 and tokens["count"] == len(tokens["tokens"]) > 0
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": text}
    rendered = post(server, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    assert "France" in post(server, "/detokenize", {"tokens": rendered}).json()["prompt"]


def test_metrics_grow_after_a_request(server, client):
    success = 'kvserve:request_success_total{finished_reason="length"}'
    complete(client, prompt=PROMPT, max_tokens=2, extra_body=IGNORE_EOS)   # the labelled counter exists now
    before = metrics(server)
    for name in ("num_requests_running", "kv_cache_usage_perc", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "time_per_output_token_seconds_count"):
        assert f"kvserve:{name}" in before
    complete(client, prompt=PROMPT, max_tokens=5, extra_body=IGNORE_EOS)
    after = metrics(server)
    assert after["kvserve:generation_tokens_total"] - before["kvserve:generation_tokens_total"] == 5
    assert after["kvserve:prompt_tokens_total"] > before["kvserve:prompt_tokens_total"]
    assert after[success] == before[success] + 1
    assert after["kvserve:time_to_first_token_seconds_count"] == before["kvserve:time_to_first_token_seconds_count"] + 1
    assert after["kvserve:time_per_output_token_seconds_count"] == \
        before["kvserve:time_per_output_token_seconds_count"] + 1
    assert after["kvserve:num_requests_running"] == 0 and after["kvserve:kv_cache_usage_perc"] == 0
