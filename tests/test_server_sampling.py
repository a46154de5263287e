"""Logprobs (completions and chat shapes, streamed or not), penalties, logit_bias and bad_words over HTTP,
against the offline engine on the same tiny model."""
from __future__ import annotations

import pytest
from server_utils import start_server, stop_server, tiny_args

from kvserve import LLM, BeamSearchParams, SamplingParams

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]
GREEDY = {"temperature": 0, "max_tokens": 10, "extra_body": {"ignore_eos": True}}
ATOL = 1e-4


@pytest.fixture(scope="module")
def server(tiny_model):
    server = start_server(tiny_args(tiny_model, "--max-model-len", "256", "--chat-template", TEMPLATE))
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="8MiB", max_model_len=256)


def model(client) -> str:
    return client.models.list().data[0].id


def offline(llm, prompt, **params):
    return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, **params),
                        use_tqdm=False)[0]


def test_completion_logprobs(client, llm):
    result = client.completions.create(model=model(client), prompt=PROMPT, logprobs=3, **GREEDY)
    logprobs = result.choices[0].logprobs
    expected = offline(llm, PROMPT, logprobs=3).outputs[0]
    assert logprobs.tokens == [e[t].decoded_token for t, e in zip(expected.token_ids, expected.logprobs)]
    assert logprobs.token_logprobs == pytest.approx([e[t].logprob for t, e in zip(expected.token_ids,
                                                                                  expected.logprobs)], abs=ATOL)
    for token, top, entry in zip(expected.token_ids, logprobs.top_logprobs, expected.logprobs):
        # The actual token and the top 3 (fewer when their strings coincide, as partial UTF-8 sequences do).
        assert top == pytest.approx({e.decoded_token: e.logprob for e in entry.values()}, abs=ATOL)
        assert len(top) <= 4 and entry[token].rank == 1   # greedy: the most likely
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(10)]


def test_completion_echo_logprobs(client, llm):
    result = client.completions.create(model=model(client), prompt=PROMPT, logprobs=2, echo=True, **GREEDY)
    logprobs = result.choices[0].logprobs
    expected = offline(llm, PROMPT, logprobs=2, prompt_logprobs=2)
    prompt_ids = expected.prompt_token_ids
    assert len(logprobs.tokens) == len(prompt_ids) + 10 == result.usage.total_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    entries = expected.prompt_logprobs[1:] + expected.outputs[0].logprobs
    ids = prompt_ids[1:] + expected.outputs[0].token_ids
    assert logprobs.token_logprobs[1:] == pytest.approx([e[t].logprob for t, e in zip(ids, entries)], abs=ATOL)
    assert logprobs.top_logprobs[1:] == [pytest.approx({e.decoded_token: e.logprob for e in entry.values()},
                                                       abs=ATOL) for entry in entries]
    assert result.choices[0].text.startswith(PROMPT)


@pytest.mark.parametrize("echo", [False, True])
def test_completion_logprobs_stream(client, echo):
    kwargs = dict(model=model(client), prompt=PROMPT, logprobs=1, echo=echo, **GREEDY)
    expected = client.completions.create(**kwargs).choices[0].logprobs
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)]
    assert len(chunks) > 1 and all(c.logprobs is not None for c in chunks)
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks for x in getattr(c.logprobs, field)] == getattr(expected, field), field


def test_chat_logprobs(client, llm):
    result = client.chat.completions.create(model=model(client), messages=MESSAGES, logprobs=True, top_logprobs=3,
                                            **GREEDY)
    content = result.choices[0].logprobs.content
    expected = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3),
                        use_tqdm=False, chat_template=TEMPLATE)[0].outputs[0]
    assert len(content) == result.usage.completion_tokens == 10
    for item, token, entry in zip(content, expected.token_ids, expected.logprobs):
        assert item.token == entry[token].decoded_token and item.bytes == list(item.token.encode())
        assert item.logprob == pytest.approx(entry[token].logprob, abs=ATOL)
        top = sorted(entry.values(), key=lambda e: e.rank)[:3]
        assert [t.token for t in item.top_logprobs] == [e.decoded_token for e in top]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([e.logprob for e in top], abs=ATOL)
        assert item.top_logprobs[0].logprob == item.logprob   # greedy: the most likely
    plain = client.chat.completions.create(model=model(client), messages=MESSAGES, logprobs=True, **GREEDY)
    assert [(c.token, c.top_logprobs) for c in plain.choices[0].logprobs.content] == \
        [(c.token, []) for c in content]
    assert client.chat.completions.create(model=model(client), messages=MESSAGES, **GREEDY).choices[0].logprobs is None


def test_chat_logprobs_stream(client):
    kwargs = dict(model=model(client), messages=MESSAGES, logprobs=True, top_logprobs=2, **GREEDY)
    expected = client.chat.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **kwargs)]
    streamed = [item for c in chunks if c.logprobs is not None for item in c.logprobs.content]
    assert streamed == expected.logprobs.content
    assert "".join(c.delta.content or "" for c in chunks) == expected.message.content


@pytest.mark.parametrize("params", [
    dict(frequency_penalty=1.5, presence_penalty=0.5), dict(repetition_penalty=1.8),
    dict(logit_bias={"200": 5.0, "17": -100}, frequency_penalty=0.3), dict(bad_words=["upon", "token"])])
def test_penalties_bias_and_bad_words_are_honoured(client, llm, params):
    result = client.completions.create(model=model(client), prompt=PROMPT, temperature=0, max_tokens=24,
                                       extra_body={"ignore_eos": True, **params})
    params = dict(params)
    bias = {int(k): v for k, v in params.pop("logit_bias", {}).items()}
    expected = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **params,
                                                   logit_bias=bias or None), use_tqdm=False)[0].outputs[0]
    plain = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert result.choices[0].text == expected.text != plain[0].outputs[0].text


def test_logit_bias_forces_a_token(client, llm):
    result = client.chat.completions.create(model=model(client), messages=MESSAGES, temperature=1.0, max_tokens=6,
                                            logit_bias={"200": 100}, extra_body={"ignore_eos": True})
    assert result.choices[0].message.content == llm.get_tokenizer().decode([200] * 6)


def test_best_of_returns_the_offline_engines_best(client, llm):
    params = dict(n=2, best_of=4, temperature=1.0, seed=3, max_tokens=10)
    result = client.completions.create(model=model(client), prompt=PROMPT, extra_body={"ignore_eos": True}, **params)
    expected = llm.generate(PROMPT, SamplingParams(ignore_eos=True, **params), use_tqdm=False)[0].outputs
    assert [c.text for c in result.choices] == [c.text for c in expected] and [c.index for c in result.choices] == [0, 1]
    assert result.usage.completion_tokens == 20


def test_beam_search_returns_the_offline_beams(client, llm):
    params = dict(n=3, max_tokens=8, extra_body={"use_beam_search": True, "length_penalty": 0.5,
                                                 "early_stopping": True})
    expected = llm.beam_search([PROMPT], BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=0.5,
                                                          early_stopping=True))[0].sequences
    result = client.completions.create(model=model(client), prompt=PROMPT, **params)
    assert [c.text for c in result.choices] == [s.text for s in expected] and len(expected) == 3
    assert [c.finish_reason for c in result.choices] == [s.finish_reason for s in expected]
    streamed = list(client.completions.create(model=model(client), prompt=PROMPT, stream=True, **params))
    assert {c.choices[0].index: c.choices[0].text for c in streamed if c.choices[0].text} == \
        {i: s.text for i, s in enumerate(expected) if s.text}
    chat = client.chat.completions.create(model=model(client), messages=MESSAGES, **params)
    prompt = llm.apply_chat_template(MESSAGES, chat_template=TEMPLATE)
    expected = llm.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=0.5,
                                                          early_stopping=True))[0].sequences
    assert [c.message.content for c in chat.choices] == [s.text for s in expected]
