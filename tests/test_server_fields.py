"""Chat and completion fields over HTTP against the offline LLM on the same tiny model; message names; request
counts in /metrics."""
from __future__ import annotations

import httpx
import pytest
from server_utils import (assert_error, metrics, openai_client, post, start_server, stop_server, tiny_args,
                          wait_until)

from kvserve import LLM, SamplingParams

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}{% if m.name %} ({{ m.name }}){% endif %}: {{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": PROMPT}]
DIALOGUE = [{"role": "system", "content": "Once upon a time"}, {"role": "user", "content": "The lazy dog"},
            {"role": "assistant", "content": "jumps over"}, {"role": "user", "content": PROMPT}]
DEFAULTS = {"temperature": 0, "max_tokens": 10}
SEEDED = {"temperature": 1.0, "seed": 11}
STOP = {"stop": [" ", "a", "e", "i", "o", "u"]}
LONG = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(tiny_model):
    server = start_server(tiny_args(tiny_model, "--max-model-len", "512", "--max-num-seqs", "4",
                                    "--chat-template", TEMPLATE))
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="8MiB", max_model_len=512)


def served(server, path: str, fields: dict) -> tuple[str, str]:
    """(text, finish reason) of the first choice of a request with ``fields`` over the defaults."""
    body = {**DEFAULTS, **({"messages": MESSAGES} if path == CHAT else {"prompt": PROMPT}), **fields}
    response = post(server, path, body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["message"]["content"] if path == CHAT else choice["text"], choice["finish_reason"]


def offline(llm, path: str, fields: dict) -> tuple[str, str]:
    """The same through LLM.generate / LLM.chat, with the server's meaning of each field."""
    fields = {**DEFAULTS, **fields}
    messages = fields.pop("messages", MESSAGES)
    add_generation_prompt = fields.pop("add_generation_prompt", True)
    fields.pop("user", None)
    if "max_completion_tokens" in fields:   # it wins over max_tokens
        fields["max_tokens"] = fields.pop("max_completion_tokens")
    params = SamplingParams(**fields)
    if path == CHAT:
        output = llm.chat(messages, params, use_tqdm=False, chat_template=TEMPLATE,
                          add_generation_prompt=add_generation_prompt)[0].outputs[0]
    else:
        output = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    return output.text, output.finish_reason


@pytest.mark.parametrize("path, base, tested", [
    (CHAT, {}, {"max_completion_tokens": 4, "max_tokens": 12}),
    (CHAT, {}, {"add_generation_prompt": False}),
    (CHAT, {}, {"messages": DIALOGUE}),
    (CHAT, {}, STOP),
    (CHAT, SEEDED, {"min_p": 0.3}),
    (COMPLETIONS, STOP, {"min_tokens": 6}),
    (COMPLETIONS, SEEDED, {"top_k": 3}),
    (COMPLETIONS, SEEDED, {"top_p": 0.5}),
    (COMPLETIONS, {}, {"user": "user-1234"}),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else v)
def test_field_gives_the_offline_output(server, llm, path, base, tested):
    expected = offline(llm, path, {**base, **tested})
    assert served(server, path, {**base, **tested}) == expected
    if "user" not in tested:   # the field changes the output, so a server ignoring it would fail
        assert offline(llm, path, base) != expected


def test_message_name_reaches_the_chat_template(server, llm):
    named = [{"role": "user", "name": "alice", "content": PROMPT}]
    rendered = post(server, "/tokenize", {"messages": named}).json()["tokens"]
    assert rendered == llm.apply_chat_template(named, TEMPLATE) != llm.apply_chat_template(MESSAGES, TEMPLATE)
    assert served(server, CHAT, {"messages": named}) == offline(llm, CHAT, {"messages": named})


def test_unknown_message_key_is_400_naming_it(server):
    messages = [{"role": "user", "content": PROMPT, "colour": "red"}]
    assert_error(post(server, CHAT, {"messages": messages}), 400, "messages", "colour")
    assert_error(post(server, "/tokenize", {"messages": messages}), 400, "messages", "colour")


def test_a_reply_sent_back_by_the_client_is_accepted(server):
    with openai_client(server) as client:
        reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, **DEFAULTS)
        sent_back = reply.choices[0].message.model_dump()   # with tool_calls, refusal, audio, ... all None
        assert {"tool_calls", "refusal", "audio"} <= sent_back.keys()
        follow_up = [*MESSAGES, sent_back, {"role": "user", "content": "Once upon a time"}]
        again = client.chat.completions.create(model=reply.model, messages=follow_up, **DEFAULTS)
    assert again.usage.prompt_tokens > reply.usage.total_tokens
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    messages = [{"role": "assistant", "content": None, "tool_calls": [call]}, *MESSAGES]
    assert_error(post(server, CHAT, {"messages": messages}), 400, "messages",
                 "messages[0].tool_calls[0].function.arguments must be a JSON object")


def test_metrics_count_requests_not_sequences(server):
    """A request with n=3 is one running request and one success; one that does not fit waits."""
    def counts(running: int, waiting: int):
        def check():
            now = metrics(server)
            return now if (now["kvserve:num_requests_running"], now["kvserve:num_requests_waiting"]) == \
                (running, waiting) else None
        return wait_until(check, timeout=10)

    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server.url}{COMPLETIONS}", json={**LONG, "n": 3}) as three:
            lines = three.iter_lines()   # kept: a collected generator would close the connection
            assert next(lines).startswith("data: ")
            assert counts(1, 0), metrics(server)
            # 3 + 2 sequences exceed --max-num-seqs 4: the second request waits until the first ends.
            with client.stream("POST", f"{server.url}{COMPLETIONS}", json={**LONG, "n": 2}) as two:
                assert two.status_code == 200
                assert counts(1, 1), metrics(server)
    assert counts(0, 0), metrics(server)
    success = 'kvserve:request_success_total{finished_reason="length"}'
    before = metrics(server).get(success, 0)
    post(server, COMPLETIONS, {"prompt": PROMPT, "n": 3, "max_tokens": 4, "ignore_eos": True, "temperature": 1})
    assert metrics(server)[success] == before + 1
