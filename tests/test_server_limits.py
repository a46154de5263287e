"""What one request may ask of the server: its body's size (413, refused while the server keeps answering and
without keeping the memory), its prompts, characters and tokens, request chat templates, and prompt scoring
(echo with max_tokens 0)."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from server_utils import assert_error, openai_client, post, start_server, stop_server, tiny_args

MAX_LEN, MAX_SEQS, MAX_PROMPTS = 256, 8, 4
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def server(tiny_model):
    server = start_server(tiny_args(tiny_model, "--max-model-len", str(MAX_LEN), "--max-num-seqs", str(MAX_SEQS),
                                    "--max-prompts-per-request", str(MAX_PROMPTS), "--chat-template", TEMPLATE,
                                    "--trust-request-chat-template"))
    yield server
    stop_server(server)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def health_latencies_while(server, work) -> tuple[object, list[float]]:
    """Run ``work`` on a thread while timing GET /health until it is done; returns its result and the times."""
    result, latencies = {}, []
    thread = threading.Thread(target=lambda: result.setdefault("value", work()))
    with httpx.Client(timeout=30) as client:
        thread.start()
        while thread.is_alive():
            start = time.perf_counter()
            assert client.get(f"{server.url}/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
    thread.join()
    return result["value"], latencies


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_50mb_body_is_413_while_health_answers_and_memory_returns(server, declared):
    body = json.dumps({"prompt": "hello " * (50 * 1024 * 1024 // 6)}).encode()
    content = body if declared else (body[i:i + 65536] for i in range(0, len(body), 65536))
    post(server, "/v1/completions", {"prompt": "warm up", "max_tokens": 2})
    before = rss_bytes(server.proc.pid)
    response, latencies = health_latencies_while(server, lambda: httpx.post(
        f"{server.url}/v1/completions", content=content, headers={"content-type": "application/json"}, timeout=120))
    after = rss_bytes(server.proc.pid)
    print(f"50 MB body ({'declared' if declared else 'chunked'}): 413; /health max {max(latencies) * 1e3:.1f} ms over "
          f"{len(latencies)} requests; RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert_error(response, 413, None, "--max-request-bytes", str(2 * 1024 * 1024))
    assert len(latencies) >= 3 and max(latencies) < 0.1, latencies
    assert abs(after - before) < 0.1 * before
    assert post(server, "/v1/completions", {"prompt": "still", "max_tokens": 2}).status_code == 200


def test_the_largest_body_is_parsed_off_the_event_loop(server):
    ids = [[1 + i % 300 for i in range(200)]] * (2 * 1024 * 1024 // 1000)   # just under 2 MiB of token ids
    body = json.dumps({"prompt": ids}).encode()
    assert len(body) <= 2 * 1024 * 1024
    response, latencies = health_latencies_while(server, lambda: httpx.post(
        f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=120))
    print(f"{len(body) / 2**20:.2f} MiB of token ids: /health max {max(latencies) * 1e3:.1f} ms over "
          f"{len(latencies)} requests")
    assert_error(response, 400, "prompt", "--max-prompts-per-request")   # refused once parsed
    assert max(latencies) < 0.1, latencies


def test_prompts_characters_and_tokens_per_request(server):
    assert_error(post(server, "/v1/completions", {"prompt": ["a"] * (MAX_PROMPTS + 1)}), 400, "prompt",
                 f"at most {MAX_PROMPTS}", "--max-prompts-per-request")
    long = "word " * (32 * MAX_LEN // 5 + 1)   # characters past the default, 32 per token of max_model_len
    assert_error(post(server, "/v1/completions", {"prompt": long}), 400, "prompt", "--max-prompt-chars")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": long}]}), 400,
                 "messages", "--max-prompt-chars")
    assert_error(post(server, "/tokenize", {"prompt": long}), 400, "prompt", "--max-prompt-chars")
    # By default a request holds at most max_num_seqs sequences of max_model_len tokens.
    many = {"prompt": ["The quick"] * MAX_PROMPTS, "n": 4, "max_tokens": MAX_LEN - 16}
    assert_error(post(server, "/v1/completions", many), 400, "max_tokens", str(MAX_SEQS * MAX_LEN),
                 "--max-request-tokens")
    assert post(server, "/v1/completions", {**many, "n": 2, "max_tokens": 2}).status_code == 200


def test_request_chat_templates_run_when_trusted(server):
    chat = {"messages": MESSAGES, "max_tokens": 2}
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert post(server, "/v1/chat/completions", {**chat, "chat_template": own}).json()["usage"]["prompt_tokens"] < \
        post(server, "/v1/chat/completions", chat).json()["usage"]["prompt_tokens"]
    assert_error(post(server, "/v1/chat/completions", {**chat, "chat_template": "{% for %}"}), 400, "messages",
                 "chat template cannot be rendered")
    assert_error(post(server, "/v1/chat/completions", {**chat, "chat_template": "{{ raise_exception('no system') }}"}),
                 400, "messages", "no system")


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_scores_the_prompt(server, stream):
    client = openai_client(server)
    model = server.args[0]
    scored = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=1,
                                       stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
    chunks = list(scored) if stream else [scored]
    choice = {"text": "".join(c.choices[0].text for c in chunks if c.choices),
              "tokens": [t for c in chunks if c.choices and c.choices[0].logprobs
                         for t in c.choices[0].logprobs.token_logprobs]}
    generated = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=1, echo=True,
                                          logprobs=1, temperature=0)
    prompt_count = generated.usage.prompt_tokens
    assert choice["text"] == "The quick brown fox"
    assert choice["tokens"] == generated.choices[0].logprobs.token_logprobs[:prompt_count]
    assert chunks[-1].usage.completion_tokens == 0 and chunks[-1].usage.prompt_tokens == prompt_count
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
