"""A failed model step fails only its requests with a 500 and the server keeps serving; an unexpected error that
stops the engine loop makes every request and /health a 503."""
from __future__ import annotations

import httpx
from server_utils import assert_error, post, start_server, stop_server, tiny_args

from kvserve.core.engine.llm_engine import FATAL_TOKEN_ENV, FAULT_TOKEN_ENV

COMPLETIONS = "/v1/completions"
FAULT = 300


def test_failed_step_is_500_and_engine_goes_on(tiny_model):
    server = start_server(tiny_args(tiny_model), env={FAULT_TOKEN_ENV: str(FAULT)})
    try:
        body = {"prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        before = post(server, COMPLETIONS, body).json()["choices"][0]["text"]
        assert_error(post(server, COMPLETIONS, {**body, "prompt": [5, FAULT]}), 500, None, "injected fault")
        stream = post(server, COMPLETIONS, {**body, "prompt": [6, FAULT], "stream": True})
        assert stream.status_code == 200 and '"code": 500' in stream.text and stream.text.endswith("data: [DONE]\n\n")
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 200
        assert health.json()["failed_steps"] == 2 and "injected fault" in health.json()["last_error"]
        assert post(server, COMPLETIONS, body).json()["choices"][0]["text"] == before
    finally:
        stop_server(server)


def test_dead_engine_is_503_everywhere(tiny_model):
    server = start_server(tiny_args(tiny_model), env={FATAL_TOKEN_ENV: str(FAULT)})
    try:
        body = {"prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0}
        assert post(server, COMPLETIONS, body).status_code == 200
        assert_error(post(server, COMPLETIONS, {**body, "prompt": [5, FAULT]}), 503, None, "injected fatal fault")
        for response in (post(server, COMPLETIONS, body), httpx.get(f"{server.url}/health")):
            assert_error(response, 503, None, "the engine has stopped", "injected fatal fault")
    finally:
        stop_server(server)
