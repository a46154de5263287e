"""GET /metrics also serves vLLM's `vllm:` names (what vLLM's Grafana dashboards read), parsed here with
prometheus_client's own parser: vLLM's types, a model_name label, the same samples as the `kvserve:` families they
mirror, and counts that agree with the requests made."""
from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import openai_client, post, start_server, stop_server, tiny_args

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
REPEATED = [5, 17, 42, 99, 3] * 7   # over two KV blocks (16 tokens): sent twice, the second finds a cached block

# vLLM name -> (vLLM's type, the kvserve family it mirrors), as vLLM's metrics logger and example dashboard name them.
VLLM = {
    "vllm:num_requests_running": ("gauge", "kvserve:num_requests_running"),
    "vllm:num_requests_waiting": ("gauge", "kvserve:num_requests_waiting"),
    "vllm:num_requests_swapped": ("gauge", "kvserve:num_requests_swapped"),
    "vllm:kv_cache_usage_perc": ("gauge", "kvserve:kv_cache_usage_perc"),
    "vllm:gpu_cache_usage_perc": ("gauge", "kvserve:kv_cache_usage_perc"),
    "vllm:prompt_tokens": ("counter", "kvserve:prompt_tokens"),
    "vllm:generation_tokens": ("counter", "kvserve:generation_tokens"),
    "vllm:num_preemptions": ("counter", "kvserve:num_preemptions"),
    "vllm:prefix_cache_queries": ("counter", "kvserve:prefix_cache_queries"),
    "vllm:prefix_cache_hits": ("counter", "kvserve:prefix_cache_hits"),
    "vllm:spec_decode_num_drafts": ("counter", "kvserve:spec_decode_num_drafts"),
    "vllm:spec_decode_num_draft_tokens": ("counter", "kvserve:spec_decode_num_draft_tokens"),
    "vllm:spec_decode_num_accepted_tokens": ("counter", "kvserve:spec_decode_num_accepted_tokens"),
    "vllm:request_success": ("counter", "kvserve:request_success"),
    "vllm:time_to_first_token_seconds": ("histogram", "kvserve:time_to_first_token_seconds"),
    "vllm:inter_token_latency_seconds": ("histogram", "kvserve:inter_token_latency_seconds"),
    "vllm:time_per_output_token_seconds": ("histogram", "kvserve:inter_token_latency_seconds"),
    "vllm:request_time_per_output_token_seconds": ("histogram", "kvserve:time_per_output_token_seconds"),
    "vllm:e2e_request_latency_seconds": ("histogram", "kvserve:e2e_request_latency_seconds"),
    "vllm:request_prompt_tokens": ("histogram", "kvserve:request_prompt_tokens"),
    "vllm:request_generation_tokens": ("histogram", "kvserve:request_generation_tokens"),
}
PER_POSITION = {"vllm:spec_decode_num_accepted_tokens_per_pos":
                ("counter", "kvserve:spec_decode_num_accepted_tokens_per_pos")}   # with speculation only


def scrape(server) -> dict:
    """GET /metrics as prometheus_client parses it: family name -> Metric (the _created gauges left out)."""
    response = httpx.get(f"{server.url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return {family.name: family for family in text_string_to_metric_families(response.text)
            if not family.name.endswith("_created")}


def value(families: dict, name: str, suffix: str = "", **labels) -> float:
    """The sum of family ``name``'s samples named ``name + suffix`` whose labels include ``labels``."""
    return sum(s.value for s in families[name].samples
               if s.name == name + suffix and labels.items() <= s.labels.items())


def samples(family, drop: str | None = None) -> list[tuple]:
    """(name suffix, labels without ``drop``, value) of each sample, sorted: what two names of a family share."""
    return sorted((s.name[len(family.name):], sorted((k, v) for k, v in s.labels.items() if k != drop), s.value)
                  for s in family.samples if not s.name.endswith("_created"))


def check_mirrors(families: dict, expected: dict, model_name: str) -> None:
    """Every expected vllm: family has vLLM's type, the served model as model_name on every sample, and exactly
    the samples of the kvserve: family it mirrors; no other vllm: family is served."""
    served = {name for name in families if name.startswith("vllm:")}
    assert served == set(expected), (sorted(served - set(expected)), sorted(set(expected) - served))
    for name, (kind, source) in expected.items():
        family = families[name]
        assert family.type == kind == families[source].type, (name, family.type)
        assert family.samples and all(s.labels.get("model_name") == model_name for s in family.samples), name
        assert samples(family, drop="model_name") == samples(families[source]), name


@pytest.fixture(scope="module")
def server(tiny_model):
    server = start_server(tiny_args(tiny_model, "--max-model-len", "256", "--chat-template", TEMPLATE))
    yield server
    stop_server(server)


def model_id(server) -> str:
    return httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]


def run_requests(server) -> list[dict]:
    """Completions (one streamed, two alike for a prefix-cache hit) and a chat, one at a time; their usages."""
    usages, model = [], model_id(server)
    for path, body in [("/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 6}),
                       ("/v1/completions", {"prompt": REPEATED, "max_tokens": 3}),
                       ("/v1/completions", {"prompt": REPEATED, "max_tokens": 4}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})]:
        response = post(server, path, {"model": model, "temperature": 0, "ignore_eos": True, **body})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] == "length"
        usages.append(response.json()["usage"])
    stream = openai_client(server).completions.create(model=model, prompt="Once upon a time", max_tokens=7,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                      stream_options={"include_usage": True})
    usages.append([chunk.usage for chunk in stream if chunk.usage is not None][0].model_dump())
    return usages


def test_vllm_names_mirror_kvserve_metrics(server):
    run_requests(server)
    check_mirrors(scrape(server), VLLM, model_id(server))


def test_vllm_counts_agree_with_the_requests(server):
    before = scrape(server)
    usages = run_requests(server)
    after = scrape(server)

    def delta(name: str, suffix: str = "", **labels) -> float:
        return value(after, name, suffix, **labels) - value(before, name, suffix, **labels)

    requests = len(usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert generated == 6 + 3 + 4 + 5 + 7
    # kvserve counts prompt tokens computed: a prefix-cache hit is looked up, not computed.
    assert delta("vllm:prefix_cache_queries", "_total") == prompt
    assert delta("vllm:prefix_cache_hits", "_total") > 0
    assert delta("vllm:prompt_tokens", "_total") + delta("vllm:prefix_cache_hits", "_total") == prompt
    assert delta("vllm:generation_tokens", "_total") == generated
    assert delta("vllm:request_success", "_total", finished_reason="length") == requests
    assert delta("vllm:request_success", "_total") == requests
    assert delta("vllm:request_prompt_tokens", "_sum") == prompt
    assert delta("vllm:request_generation_tokens", "_sum") == generated
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens",
                      "request_generation_tokens", "request_time_per_output_token_seconds"):
        assert delta(f"vllm:{histogram}", "_count") == requests, histogram
    # one output per engine step and request, each with one token: every token after the first is an interval
    for histogram in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert delta(histogram, "_count") == generated - requests, histogram
        assert delta(histogram, "_bucket", le="+Inf") == generated - requests, histogram
    assert delta("vllm:e2e_request_latency_seconds", "_sum") >= delta("vllm:time_to_first_token_seconds", "_sum") > 0
    assert value(after, "vllm:num_requests_running") == value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == value(after, "vllm:gpu_cache_usage_perc") == 0
    assert value(after, "vllm:num_preemptions", "_total") == 0


def test_speculative_families_are_mirrored_with_their_positions(tiny_model):
    server = start_server(tiny_args(tiny_model, "--speculative-config", json.dumps(NGRAM)))
    try:
        name = model_id(server)
        # as tests/test_speculative.py's: the tiny model's greedy tokens there take n-gram proposals
        response = post(server, "/v1/completions", {"model": name, "prompt": [5, 17, 42, 99, 3] * 6,
                                                     "max_tokens": 30, "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200, response.text
        families = scrape(server)
    finally:
        stop_server(server)
    check_mirrors(families, {**VLLM, **PER_POSITION}, name)
    positions = {s.labels["position"] for s in families["vllm:spec_decode_num_accepted_tokens_per_pos"].samples}
    assert positions == {str(i) for i in range(NGRAM["num_speculative_tokens"])}
    assert value(families, "vllm:spec_decode_num_draft_tokens", "_total") > 0
    assert value(families, "vllm:generation_tokens", "_total") == response.json()["usage"]["completion_tokens"]
