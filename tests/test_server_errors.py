"""Server errors in OpenAI's shape, API keys, client disconnects, graceful shutdown, and a bad model path."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import httpx
import openai
import pytest
from server_utils import (Server, assert_error, free_port, metrics, post, start_server, stop_server, tiny_args,
                          token_count, wait_until)

pytestmark = pytest.mark.slow

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
NAMES = ["tiny-a", "tiny-b"]
MAX_LEN = 512
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]
LONG = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True}   # seconds of decoding


@pytest.fixture(scope="module")
def server(tiny_model):
    server = start_server(tiny_args(tiny_model, "--max-model-len", str(MAX_LEN), "--served-model-name", *NAMES,
                                    "--chat-template", TEMPLATE))
    yield server
    stop_server(server)


def test_served_model_names_and_wrong_model(server):
    assert [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]] == NAMES
    response = post(server, COMPLETIONS, {"model": "tiny-b", "prompt": "The quick", "max_tokens": 2})
    assert response.status_code == 200 and response.json()["model"] == "tiny-b"
    assert post(server, CHAT, {"messages": MESSAGES, "max_tokens": 2}).json()["model"] == "tiny-a"
    for path, body in ((COMPLETIONS, {"prompt": "hi"}), (CHAT, {"messages": MESSAGES})):
        assert_error(post(server, path, {**body, "model": "nope"}), 404, "model", "nope")


@pytest.mark.parametrize("path, field, value", [
    (COMPLETIONS, "temperature", -1), (COMPLETIONS, "top_p", 2), (COMPLETIONS, "max_tokens", 0),
    (COMPLETIONS, "n", 0), (COMPLETIONS, "top_k", -5), (COMPLETIONS, "stop", ""), (CHAT, "temperature", -1),
    (CHAT, "max_tokens", 0), (CHAT, "n", 0), (COMPLETIONS, "temperature", "hot"), (COMPLETIONS, "logprobs", 21),
    (COMPLETIONS, "logprobs", -1), (CHAT, "top_logprobs", 21), (COMPLETIONS, "presence_penalty", 2.5),
    (CHAT, "frequency_penalty", -3), (CHAT, "repetition_penalty", 0), (COMPLETIONS, "logit_bias", {"5": 101}),
    (COMPLETIONS, "logit_bias", {"384": 1}), (CHAT, "logit_bias", {"x": 1}), (COMPLETIONS, "bad_words", [" "])])
def test_invalid_parameter_is_400_naming_it(server, path, field, value):
    body = {"prompt": "The quick"} if path == COMPLETIONS else {"messages": MESSAGES}
    assert_error(post(server, path, {**body, field: value}), 400, field, field)


def test_best_of_below_n_or_streamed_is_400(server):
    assert_error(post(server, COMPLETIONS, {"prompt": "The quick", "n": 2, "best_of": 1}), 400, "best_of", ">= 2")
    assert_error(post(server, COMPLETIONS, {"prompt": "The quick", "best_of": 2, "stream": True}), 400, "best_of",
                 "cannot be streamed")


def test_beam_search_rejects_what_it_cannot_honour(server):
    beam = {"prompt": "The quick", "use_beam_search": True, "n": 2}
    for field, value in (("logprobs", 1), ("top_p", 0.5), ("stop", "x"), ("seed", 1)):
        assert_error(post(server, COMPLETIONS, {**beam, field: value}), 400, field, "cannot be used with use_beam_search")
    assert_error(post(server, CHAT, {"messages": MESSAGES, "use_beam_search": True, "logprobs": True}), 400,
                 "logprobs", "use_beam_search")
    assert_error(post(server, COMPLETIONS, {"prompt": "The quick", "length_penalty": 2.0}), 400, "length_penalty",
                 "applies only to beam search")
    assert_error(post(server, COMPLETIONS, {**beam, "early_stopping": "sometimes"}), 400, "early_stopping")


def test_top_logprobs_needs_logprobs(server):
    assert_error(post(server, CHAT, {"messages": MESSAGES, "top_logprobs": 2}), 400, "top_logprobs", "logprobs: true")


def test_unsupported_parameter_is_400_naming_it(server):
    assert_error(post(server, COMPLETIONS, {"prompt": "The quick", "suffix": "!"}), 400, "suffix", "suffix",
                 "not supported")


def test_tools_that_need_a_parser_this_server_lacks_are_400(server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for tool_choice, param in ((None, "tools"), ("auto", "tool_choice")):
        assert_error(post(server, CHAT, {"messages": MESSAGES, "tools": tools, "tool_choice": tool_choice}), 400,
                     param, "--enable-auto-tool-choice --tool-call-parser NAME")


def test_malformed_requests(server):
    assert_error(post(server, COMPLETIONS, {"prompt": "hi", "colour": "red"}), 400, "colour", "colour")
    message = assert_error(post(server, COMPLETIONS, content='{"prompt": "hi",',
                                headers={"content-type": "application/json"}), 400, None, "invalid JSON body")
    assert post(server, COMPLETIONS, content='{"prompt": "hi",',
                headers={"content-type": "application/json"}).json()["error"]["param"] is None, message
    assert_error(post(server, COMPLETIONS, {"prompt": "hi", "stop_token_ids": [384]}), 400, "stop_token_ids", "384")
    assert_error(post(server, CHAT, {"max_tokens": 3}), 400, "messages", "messages")
    assert_error(post(server, CHAT, {"messages": []}), 400, "messages")
    assert_error(post(server, COMPLETIONS, {"max_tokens": 3}), 400, "prompt")
    for empty in ("", [], [[1, 2], []]):
        assert_error(post(server, COMPLETIONS, {"prompt": empty}), 400, "prompt", "empty")
    for ids in ([1, 384], [[1, 2], [384]]):   # the tiny vocabulary has 384 tokens
        assert_error(post(server, COMPLETIONS, {"prompt": ids}), 400, "prompt", "384")
    assert_error(post(server, COMPLETIONS, {"prompt": [[1, 2], [-1]]}), 400, "prompt", "prompt.1.0", "greater than or equal to 0")
    assert_error(post(server, "/detokenize", {"tokens": [384]}), 400, "tokens")
    assert_error(post(server, "/tokenize", {"prompt": "a", "messages": MESSAGES}), 400, "prompt")


def test_prompt_longer_than_the_context(server):
    text = "The quick brown fox jumps over the lazy dog. " * 60
    count = token_count(server, prompt=text)
    assert count > MAX_LEN
    assert_error(post(server, COMPLETIONS, {"prompt": text}), 400, "prompt", str(count), str(MAX_LEN))
    assert_error(post(server, COMPLETIONS, {"prompt": [5] * MAX_LEN}), 400, "prompt", str(MAX_LEN))
    assert_error(post(server, CHAT, {"messages": [{"role": "user", "content": text}]}), 400, "messages",
                 str(MAX_LEN))


def test_prompt_plus_max_tokens_over_the_context(server):
    message = assert_error(post(server, COMPLETIONS, {"prompt": [5] * 500, "max_tokens": 13}), 400, "max_tokens")
    assert all(str(n) in message for n in (MAX_LEN, 513, 500, 13)), message
    chat = {"messages": MESSAGES, "max_tokens": MAX_LEN}
    prompt_len = token_count(server, messages=MESSAGES)
    assert_error(post(server, CHAT, chat), 400, "max_tokens", str(MAX_LEN), str(prompt_len + MAX_LEN))
    # Exactly the context is fine, and a default max_tokens is capped to the room left.
    for body, generated in (({"max_tokens": 12}, 12), ({}, 7)):
        prompt = [5] * (MAX_LEN - generated)
        result = post(server, COMPLETIONS, {"prompt": prompt, "ignore_eos": True, **body}).json()
        assert result["usage"] == {"prompt_tokens": MAX_LEN - generated, "completion_tokens": generated,
                                   "total_tokens": MAX_LEN}, result
        assert result["choices"][0]["finish_reason"] == "length"


def wait_idle(server, before: dict, max_tokens: int) -> dict:
    """The engine has let the request go: nothing runs, no KV block is used, and it stopped before the end."""
    def idle():
        now = metrics(server)
        return now if now["kvserve:num_requests_running"] == 0 and now["kvserve:kv_cache_usage_perc"] == 0 else None
    now = wait_until(idle, timeout=10)
    assert now, metrics(server)
    generated = now["kvserve:generation_tokens_total"] - before["kvserve:generation_tokens_total"]
    assert 0 < generated < max_tokens, f"the request was not aborted: {generated} tokens generated"
    return now


def test_disconnect_during_stream_frees_kv_blocks(server):
    before = metrics(server)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server.url}{COMPLETIONS}", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            chunks = []
            for line in lines:
                chunks += [line] if line.startswith("data: ") else []
                if len(chunks) == 3:
                    break
            busy = metrics(server)
            assert busy["kvserve:num_requests_running"] == 1 and busy["kvserve:kv_cache_usage_perc"] > 0
    wait_idle(server, before, LONG["max_tokens"])


def test_client_timeout_frees_kv_blocks(server):
    before = metrics(server)
    with pytest.raises(httpx.ReadTimeout):
        post(server, COMPLETIONS, LONG, timeout=0.1)
    wait_idle(server, before, LONG["max_tokens"])
    assert post(server, COMPLETIONS, {"prompt": "The quick", "max_tokens": 3}).status_code == 200


@pytest.fixture(scope="module", params=["flag", "env"])
def keyed(request, tiny_model):
    key = f"secret-{request.param}"
    server = (start_server(tiny_args(tiny_model, "--api-key", key)) if request.param == "flag" else
              start_server(tiny_args(tiny_model), env={"KVSERVE_API_KEY": key}))
    yield server, key
    stop_server(server)


def test_api_key(keyed):
    server, key = keyed
    assert httpx.get(f"{server.url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
        assert_error(httpx.get(f"{server.url}/v1/models", headers=headers), 401)
        assert_error(post(server, "/tokenize", {"prompt": "hi"}, headers=headers), 401)
    right = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{server.url}/v1/models", headers=right).status_code == 200
    assert post(server, "/tokenize", {"prompt": "hi"}, headers=right).status_code == 200
    with openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model=server.args[0], prompt="hi", max_tokens=2)
    with openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0) as client:
        result = client.completions.create(model=server.args[0], prompt="The quick", max_tokens=3, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert result.usage.completion_tokens == 3


@pytest.fixture(scope="module", params=["SIGTERM", "SIGINT"])
def drained(request, tiny_model):
    """A server sent SIGTERM or SIGINT while it streams a completion: what the client read, and how it ended."""
    server = start_server(tiny_args(tiny_model, "--max-model-len", str(MAX_LEN)))
    refused, data = False, []
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server.url}{COMPLETIONS}", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            for line in lines:
                data += [line[6:]] if line.startswith("data: ") else []
                if len(data) == 3:
                    break
            server.proc.send_signal(getattr(signal, request.param))

            def refuses() -> bool:
                try:
                    httpx.get(f"{server.url}/health", timeout=1)
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                    return True   # refused, or reset while the listener closes
                return False
            refused = wait_until(refuses, timeout=10, interval=0.05)
            data += [line[6:] for line in lines if line.startswith("data: ")]
    try:
        code = server.proc.wait(60)
    except subprocess.TimeoutExpired:
        stop_server(server)
        raise
    yield data, refused, code, server
    stop_server(server)   # already gone: checks the exit code once more


def test_in_flight_stream_completes_on_sigterm_and_sigint(drained):
    data, refused, code, server = drained
    assert refused, "the server still accepted connections after the signal"
    assert data[-1] == "[DONE]", data[-3:]
    chunks = [json.loads(d) for d in data[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "length"]
    assert code == 0, server.output()[-3000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")


def test_503_while_the_engine_loads():
    """The default model loads for seconds after the port opens: requests meanwhile get OpenAI-shaped 503s."""
    server = Server(["--max-model-len", "256", "--kv-cache-memory", "64MiB"])

    def first_answer():
        try:
            return httpx.get(f"{server.url}/health", timeout=2)
        except httpx.TransportError:
            return None if server.proc.poll() is None else server.output()
    try:
        health = wait_until(first_answer, timeout=120, interval=0.02)
        assert isinstance(health, httpx.Response), health
        assert_error(health, 503, None, "still loading")
        assert_error(post(server, COMPLETIONS, {"prompt": "hi", "max_tokens": 2}), 503, None, "still loading")
        assert server.wait_ready(240)
        assert post(server, COMPLETIONS, {"prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        stop_server(server)


def test_nonexistent_model_path_fails_fast():
    start = time.monotonic()
    result = subprocess.run(["kvserve", "serve", "/nonexistent/path", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "/nonexistent/path" in result.stderr and "could not start" in result.stderr, result.stderr
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("path, body, param, words", [
    (COMPLETIONS, {"prompt": [True, 5]}, "prompt", "prompt"),
    (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [True]}, "stop_token_ids", "valid integer"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "5"}, "max_tokens", "valid integer"),
    (COMPLETIONS, '{"prompt": "hi", "temperature": 1e999}', "temperature", "finite"),   # JSON's infinity
    ("/tokenize", {"messages": []}, "messages", "at least 1"),
    (CHAT, {"messages": MESSAGES, "chat_template": TEMPLATE}, "chat_template", "--trust-request-chat-template"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, "max_tokens", "echo: true"),
])
def test_user_input_never_reaches_a_500(server, path, body, param, words):
    response = post(server, path, content=body, headers={"content-type": "application/json"}) \
        if isinstance(body, str) else post(server, path, body)
    assert_error(response, 400, param, words)


def test_unknown_routes_and_methods_answer_in_openai_shape(server):
    assert_error(post(server, "/v1/nothing", {}), 404, None, "Not Found")
    assert_error(httpx.get(f"{server.url}{COMPLETIONS}", timeout=30), 405, None, "Method Not Allowed")
