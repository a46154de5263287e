"""`kvserve bench serve`: one request alone, then N at once, against a running server (stdlib HTTP only)."""
from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

TOPICS = ["a lighthouse", "a robot", "the ocean", "a mountain", "a library", "a train", "a garden", "a comet"]


def complete(base_url: str, model: str, prompt: str, max_tokens: int, api_key: str | None) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{base_url}/v1/completions", body, headers)
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def run(base_url: str, concurrency: int, max_tokens: int, api_key: str | None = None) -> dict:
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=30) as response:
        model = json.load(response)["data"][0]["id"]
    prompts = [f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i})." for i in range(concurrency)]
    complete(base_url, model, prompts[0], 4, api_key)   # warm-up
    start = time.perf_counter()
    complete(base_url, model, prompts[0], max_tokens, api_key)
    alone = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: complete(base_url, model, p, max_tokens, api_key), prompts))
    together = time.perf_counter() - start
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    return {"model": model, "concurrency": concurrency, "max_tokens": max_tokens, "one_request_s": round(alone, 3),
            "concurrent_s": round(together, 3), "serial_estimate_s": round(alone * concurrency, 3),
            "speedup_vs_serial": round(alone * concurrency / together, 2),
            "output_tokens_per_s": round(tokens / together, 1)}


def add_parser(commands) -> None:
    parser = commands.add_parser("serve", help="time one request alone, then N concurrent ones, on a server")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--api-key", default=None)
    parser.set_defaults(bench=lambda args: print(json.dumps(
        run(args.base_url.rstrip("/"), args.concurrency, args.max_tokens, args.api_key), indent=2)))
