"""`kvserve bench serve`: vLLM's `bench serve` against a running OpenAI-compatible server: random token-id
prompts sent as streamed completions (Poisson arrivals at a finite rate), timed per request. Stdlib HTTP only."""
from __future__ import annotations

import http.client
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
from tqdm import tqdm

from kvserve.core.bench.report import emit, parse_percentiles, percentiles
from kvserve.core.bench.throughput import parse_range, random_workload

SLO_KEYS = ("ttft", "tpot", "e2el")
MAX_ERRORS_SHOWN = 5
READ_TIMEOUT_S = 3600   # a request may wait long in the server's queue before its first byte


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)   # gaps between streamed chunks, after the first
    latency: float = 0.0                             # request sent -> last chunk
    output_tokens: int = 0


def parse_goodput(items: list[str]) -> dict[str, float]:
    """['ttft:500 tpot:50', 'e2el:2000'] -> {'ttft': 500.0, 'tpot': 50.0, 'e2el': 2000.0} (milliseconds)."""
    slos = {}
    for item in (part for text in items for part in text.split()):
        key, sep, value = item.partition(":")
        if key not in SLO_KEYS or not sep:
            raise ValueError(f"--goodput takes KEY:MILLISECONDS pairs, KEY one of {', '.join(SLO_KEYS)}; "
                             f"got {item!r}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {key} needs a number of milliseconds, got {value!r}") from None
        if not slos[key] > 0:
            raise ValueError(f"--goodput {key} must be > 0 milliseconds, got {value!r}")
    if not slos:
        raise ValueError(f"--goodput needs at least one KEY:MILLISECONDS pair, KEY one of {', '.join(SLO_KEYS)}")
    return slos


class Client:
    """One HTTP connection per request, so requests never wait on each other in the client."""

    def __init__(self, base_url: str, api_key: str | None):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--base-url must look like http://HOST:PORT, got {base_url!r}")
        self.base_url = base_url
        self.https, self.host, self.port = parts.scheme == "https", parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=timeout)

    def wait_until_ready(self, timeout: float) -> None:
        """Poll /health, which answers 503 while the server still loads its model (or is unreachable at first)."""
        deadline = time.monotonic() + timeout
        while True:
            conn = self.connect(10)
            try:
                conn.request("GET", f"{self.prefix}/health", headers=self.headers)
                if conn.getresponse().status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise ValueError(f"{self.base_url}/health did not answer 200 within {timeout:g} s; is the server "
                                 "running, and is --base-url right?")
            time.sleep(0.5)

    def first_model(self) -> str:
        conn = self.connect(30)
        try:
            conn.request("GET", f"{self.prefix}/v1/models", headers=self.headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise ValueError(f"GET {self.base_url}/v1/models answered {response.status}: {error_text(body)}")
            return json.loads(body)["data"][0]["id"]
        except (OSError, http.client.HTTPException) as exc:
            raise ValueError(f"cannot list models at {self.base_url}/v1/models ({exc}); is the server running, "
                             "and is --base-url right?") from None
        finally:
            conn.close()


def error_text(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:300]


def send(client: Client, model: str, prompt: list[int], output_len: int) -> RequestResult:
    """One streamed completion; failures are returned, never raised."""
    result = RequestResult(len(prompt))
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    conn = client.connect(READ_TIMEOUT_S)
    start = last = time.perf_counter()
    try:
        conn.request("POST", f"{client.prefix}/v1/completions", body, client.headers)
        response = conn.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {error_text(response.read())}"
            return result
        usage, done, chunks = None, False, 0
        for line in response:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                error = event["error"]
                result.error = f"error event: {error.get('message', error) if isinstance(error, dict) else error}"
                return result
            if event.get("choices"):
                now = time.perf_counter()
                if chunks:
                    result.itl.append(now - last)
                else:
                    result.ttft = now - start
                chunks, last = chunks + 1, now
            usage = event.get("usage") or usage
        if not done or not chunks or usage is None:
            missing = "[DONE]" if not done else "a completion chunk" if not chunks else "the usage chunk"
            result.error = f"the stream ended without {missing}"
            return result
        result.latency, result.output_tokens, result.success = last - start, usage["completion_tokens"], True
    except Exception as exc:   # any failure is this request's, reported, not the benchmark's
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return result


def arrival_times(num_prompts: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: all at once, or a Poisson process."""
    if math.isinf(request_rate):
        return [0.0] * num_prompts
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num_prompts)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()


def run_requests(client: Client, model: str, prompts: list[list[int]], output_len: int, times: list[float],
                 max_concurrency: int | None, show_progress: bool) -> tuple[list[RequestResult], float]:
    bar, lock = tqdm(total=len(prompts), desc="requests", disable=not show_progress), threading.Lock()

    def tick(_) -> None:
        with lock:
            bar.update(1)

    futures = []
    start = time.perf_counter()
    # A pool of max_concurrency workers holds back requests that arrive while that many run, as vLLM's semaphore.
    with ThreadPoolExecutor(max_concurrency or len(prompts)) as pool:
        for prompt, at in zip(prompts, times):
            time.sleep(max(0.0, start + at - time.perf_counter()))
            futures.append(pool.submit(send, client, model, prompt, output_len))
            futures[-1].add_done_callback(tick)
        results = [f.result() for f in futures]
    duration = time.perf_counter() - start
    bar.close()
    return results, duration


def summarize(results: list[RequestResult], duration: float, ps: tuple[float, ...],
              slos: dict[str, float] | None) -> dict:
    done = [r for r in results if r.success]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0 for r in done]
    input_tokens, output_tokens = sum(r.prompt_len for r in done), sum(r.output_tokens for r in done)
    summary = {"completed": len(done), "failed": len(results) - len(done), "duration_s": round(duration, 3),
               "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
               "request_throughput": round(len(done) / duration, 3),
               "output_throughput": round(output_tokens / duration, 3),
               "total_token_throughput": round((input_tokens + output_tokens) / duration, 3)}
    if slos:
        measured = [{"ttft": r.ttft, "tpot": tpot, "e2el": r.latency} for r, tpot in zip(done, tpots)]
        good = sum(all(m[k] * 1000 <= slo for k, slo in slos.items()) for m in measured)
        summary["request_goodput"] = round(good / duration, 3)
    summary["ttft_ms"] = percentiles([r.ttft for r in done], ps)
    # As vLLM: a request with a single output token has no TPOT (it counts as 0 only for goodput).
    summary["tpot_ms"] = percentiles([t for r, t in zip(done, tpots) if r.output_tokens > 1], ps)
    summary["itl_ms"] = percentiles([gap for r in done for gap in r.itl], ps)
    summary["e2el_ms"] = percentiles([r.latency for r in done], ps)
    return summary


def bench(args) -> int:
    if args.num_prompts < 1 or args.output_len < 1:
        raise ValueError(f"--num-prompts and --output-len must be >= 1, got {args.num_prompts} and {args.output_len}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 requests/s (inf: all at once), got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    ps = parse_percentiles(args.metric_percentiles)
    slos = parse_goodput(args.goodput) if args.goodput else None
    prompts = random_workload(args.num_prompts, parse_range(args.input_len), args.seed)
    client = Client(args.base_url.rstrip("/"), args.api_key)
    client.wait_until_ready(args.ready_timeout)
    model = args.model or client.first_model()
    times = arrival_times(args.num_prompts, args.request_rate, args.seed)
    results, duration = run_requests(client, model, prompts, args.output_len, times, args.max_concurrency,
                                     not args.disable_tqdm)
    rate = args.request_rate if math.isfinite(args.request_rate) else "inf"
    result = {"base_url": client.base_url, "model": model, "dataset": args.dataset, "num_prompts": args.num_prompts,
              "input_len": args.input_len, "output_len": args.output_len, "seed": args.seed, "request_rate": rate,
              "max_concurrency": args.max_concurrency, **summarize(results, duration, ps, slos)}
    if slos:
        result["goodput_slo_ms"] = slos
    result["errors"] = [r.error for r in results if not r.success][:MAX_ERRORS_SHOWN]
    emit(result, args.output_json, "Serving Benchmark Result")
    return 0 if result["completed"] else 1


def add_parser(commands) -> None:
    parser = commands.add_parser("serve", help="latency and throughput of a running OpenAI-compatible server")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--dataset", default="random", choices=["random"])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", default="64:256", help="prompt length range lo:hi, inclusive")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests/s, Poisson arrivals (default inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests at once")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                        help=f"SLOs in milliseconds, e.g. ttft:500 tpot:50 e2el:2000 (keys: {', '.join(SLO_KEYS)})")
    parser.add_argument("--metric-percentiles", default="50,90,99", help="comma-separated, e.g. 50,90,99")
    parser.add_argument("--ready-timeout", type=float, default=600,
                        help="seconds to wait for the server to finish loading (/health answering 200)")
    parser.add_argument("--output-json", default=None, help="also save the result here as JSON")
    parser.add_argument("--disable-tqdm", action="store_true")
    parser.set_defaults(bench=bench)
