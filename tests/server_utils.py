"""Helpers for the server tests: run a real `kvserve serve` process on a free local port and talk to it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time

import httpx
import openai
import pytest

DEFAULT_NAME = "SmolLM2-135M-Instruct"
ERROR_FIELDS = {"message", "type", "param", "code"}


def tiny_args(tiny_model, *extra: str) -> list[str]:
    """Server arguments for the tiny random-weight Llama (the tiny_model fixture builds it)."""
    return [tiny_model("llama-tied-gqa"), "--dtype", "float32", "--kv-cache-memory", "8MiB", *extra]


def openai_client(server: Server, timeout: float = 120) -> openai.OpenAI:
    """The official client for ``server``, without retries (a retry would hide a failed request)."""
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=timeout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `kvserve serve ARGS --port N` subprocess; its stdout and stderr go to a temporary file."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.args, self.env = args, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        fd, self.log_path = tempfile.mkstemp(prefix="kvserve-serve-", suffix=".log")
        os.close(fd)
        inherited = {k: v for k, v in os.environ.items() if k != "KVSERVE_API_KEY"}
        with open(self.log_path, "ab") as log:   # append mode: our reads never move the server's write position
            self.proc = subprocess.Popen(["kvserve", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, env={**inherited, **(env or {})})

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    def wait_ready(self, timeout: float) -> bool:
        """True once GET /health answers 200; False if the process exits first (fails on the deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        self.proc.wait()
        pytest.fail(f"server not healthy after {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"server ignored SIGTERM for {timeout}s:\n{self.output()}")


def start_server(args: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> Server:
    """Start a server and wait until it is healthy; fails the test with the server's output if it dies."""
    for _ in range(3):
        server = Server(args, env)
        if server.wait_ready(timeout):
            return server
        output = server.output()
        if "address already in use" not in output.lower():   # lost the race for the free port: try another
            break
    pytest.fail(f"`kvserve serve {' '.join(args)}` exited with {server.proc.returncode}:\n{output}")


def stop_server(server: Server) -> None:
    """SIGTERM; the server must shut down gracefully and exit 0."""
    code = server.stop()
    output = server.output()
    os.unlink(server.log_path)
    assert code == 0, f"server exited with {code}:\n{output[-5000:]}"


def metrics(server: Server) -> dict[str, float]:
    """The Prometheus samples of GET /metrics, keyed by name with labels, e.g. 'x_total{a="b"}'."""
    response = httpx.get(f"{server.url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def wait_until(condition, timeout: float, interval: float = 0.1):
    """Poll ``condition()`` until it returns something truthy; returns it, or the last value on the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def kill_mid_stream(client: openai.OpenAI, model: str, pid: int) -> None:
    """SIGKILL process ``pid`` once a long streamed completion has its first token; the stream must then fail."""
    stream = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=500, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def post(server: Server, path: str, body=None, *, content: str | bytes | None = None, headers=None,
         timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body if content is None else None, content=content,
                      headers=headers, timeout=timeout)


def assert_error(response: httpx.Response, status: int, param: str | None = None, *contains: str) -> str:
    """Check an OpenAI-shaped error; returns its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    error = body["error"]
    assert error["code"] == status and isinstance(error["type"], str) and error["message"], body
    if param is not None:
        assert error["param"] == param, body
    for text in contains:
        assert text in error["message"], body
    return error["message"]


def token_count(server: Server, **body) -> int:
    response = post(server, "/tokenize", body)
    assert response.status_code == 200, response.text
    assert response.json()["count"] == len(response.json()["tokens"])
    return response.json()["count"]
