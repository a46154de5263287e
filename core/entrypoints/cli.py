"""The ``kvserve`` command: generate, chat, plugins."""
from __future__ import annotations

import argparse
import json
import sys

from kvserve.core.bench import latency as latency_bench
from kvserve.core.bench import serving as serving_bench
from kvserve.core.bench import throughput as throughput_bench
from kvserve.core.config import EXECUTOR_BACKENDS, KV_CACHE_DTYPES, STRUCTURED_OUTPUTS_BACKENDS
from kvserve.core.entrypoints.openai.limits import limit_args
from kvserve.core.quantization import METHODS as QUANTIZATION_METHODS

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"

def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory", default=None, help="KV cache budget, e.g. 4GiB (CPU default 4GiB)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                        help="fp8 (e4m3) / fp8_e5m2: the KV cache in 8 bits, twice bfloat16's tokens in a budget")
    parser.add_argument("--calculate-kv-scales", action="store_true",
                        help="with an FP8 KV cache: each layer's scales from the first batch's keys and values, "
                        "instead of the checkpoint's (or 1.0)")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
    parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"])
    parser.add_argument("--swap-space", default="4", help="GiB (or a size like 512MiB) of host memory for swapped-out "
                        "KV blocks, with --preemption-mode swap")
    parser.add_argument("--device", default=None, help="platform name (see `kvserve plugins`)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="ranks (processes on this machine) to split the model over")
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                        help="stages to split the model's layers over, each of --tensor-parallel-size ranks")
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                        help="engine replicas, each with the whole model, that requests are balanced over")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="split mixture-of-experts layers over the ranks by experts, not by columns")
    parser.add_argument("--distributed-executor-backend", default="mp", choices=list(EXECUTOR_BACKENDS),
                        help="where ranks 1.. run: processes spawned here (mp), or Ray actors (ray)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every step eagerly, without the platform's graphs (CUDA/HIP graphs, CPU replays)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    parser.add_argument("--quantization", "-q", default=None, choices=list(QUANTIZATION_METHODS),
                        help="; ".join(f"{name}: {what}" for name, what in QUANTIZATION_METHODS.items()))
    parser.add_argument("--quantization-group-size", type=int, default=None,
                        help="with -q int4: inputs per group (16, 32, 64, 128 or 256; default 32)")
    parser.add_argument("--speculative-config", type=json_object, default=None,
                        help='speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 3}')
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                        help="dummy: random weights of the model's shapes, no checkpoint tensors read (benchmarks)")
    parser.add_argument("--structured-outputs-backend", default="auto", choices=list(STRUCTURED_OUTPUTS_BACKENDS),
                        help="grammar library for structured outputs; auto: xgrammar, else llguidance where "
                             "xgrammar cannot compile a constraint")
    parser.add_argument("--structured-outputs-max-bytes", type=int, default=64 * 1024,
                        help="the largest schema, regex or grammar a request may send, in bytes")
    parser.add_argument("--structured-outputs-compile-timeout", type=float, default=10.0,
                        help="seconds a request may wait for its constraint to compile before it is refused")
    parser.add_argument("--reasoning-parser", default=None,
                        help="the model's reasoning format (deepseek_r1, qwen3, or a plugin's): constraints start "
                             "after the reasoning, and the server moves it into reasoning_content")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--sampling-seed", type=int, default=None)


ENGINE_OPTIONS = ("tokenizer", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                  "kv_cache_memory", "num_gpu_blocks_override", "enable_chunked_prefill", "enable_prefix_caching",
                  "preemption_mode", "swap_space", "device", "enforce_eager", "seed", "quantization",
                  "quantization_group_size", "load_format", "kv_cache_dtype",
                  "calculate_kv_scales", "speculative_config", "tensor_parallel_size",
                  "pipeline_parallel_size", "data_parallel_size", "enable_expert_parallel",
                  "distributed_executor_backend", "structured_outputs_backend", "structured_outputs_max_bytes",
                  "structured_outputs_compile_timeout", "reasoning_parser")


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def engine_options(args) -> dict:
    template = args.chat_template
    if template is not None and not template.lstrip().startswith("{"):
        with open(template) as f:
            template = f.read()
    return {**{name: getattr(args, name) for name in ENGINE_OPTIONS}, "chat_template": template}


def build_llm(args):
    from kvserve.core.entrypoints.llm import LLM

    return LLM(args.model, **engine_options(args))


def sampling_params(args):
    from kvserve.core.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.sampling_seed)


def cmd_generate(args) -> None:
    params = sampling_params(args)
    llm = build_llm(args)
    for output in llm.generate(args.prompts, params, use_tqdm=len(args.prompts) > 1):
        print(output.outputs[0].text)


def cmd_chat(args) -> None:
    params = sampling_params(args)
    llm = build_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


def cmd_serve(args) -> int:
    import os

    from kvserve.core.config import build_engine_config
    from kvserve.core.entrypoints.openai.api_server import serve
    from kvserve.core.entrypoints.openai.limits import limits_from_args
    from kvserve.core.entrypoints.openai.tools import reply_parsers
    from kvserve.core.log import init_logging

    init_logging()
    model = args.model_tag or args.model
    config = build_engine_config(model, **engine_options(args))
    names = args.served_model_name or [model or DEFAULT_SERVED_NAME]
    api_key = args.api_key or os.environ.get("KVSERVE_API_KEY") or None
    parsers = reply_parsers(args.enable_auto_tool_choice, args.tool_call_parser, args.reasoning_parser)
    return serve(config, args.host, args.port, names, api_key, parsers, limits_from_args(args))


def cmd_plugins(args) -> None:
    from kvserve.plugins.manager import PluginManager

    manager = PluginManager()
    rows = [(r.name, r.group, r.package, r.version, r.status) for r in manager.records]
    header = ("NAME", "GROUP", "PACKAGE", "VERSION", "STATUS")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + row[4])
    for record in manager.records:
        if record.info is not None and record.info.details:
            facts = ", ".join(f"{k}: {v}" for k, v in record.info.details.items())
            print(f"  {record.info.name}: {facts}")
    try:
        print(f"\nselected platform: {manager.select_platform().name}")
    except ValueError as exc:
        print(f"\nno platform selected: {exc}")


def cmd_conformance(args) -> int:
    import os

    try:
        import pytest
    except ImportError:
        raise ValueError("kvserve conformance runs its checks with pytest, which is not installed: pip install pytest")
    from kvserve import conformance
    from kvserve.conformance.plugin import OPTION
    from kvserve.plugins.manager import PluginManager

    PluginManager().select_platform(args.platform)   # an unknown or unavailable one: an error before any check
    # The suite's folder by path, with no configuration file: the caller's pytest settings do not apply to it.
    folder = os.path.dirname(conformance.__file__)
    return int(pytest.main([folder, "-c", os.devnull, "--rootdir", folder, "--import-mode=importlib",
                            "-p", "no:cacheprovider", "-q", "-rfEs", OPTION, args.platform, *args.pytest_args]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvserve", description="LLM inference and serving engine")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate a completion for each prompt")
    generate.add_argument("prompts", nargs="+")
    chat = commands.add_parser("chat", help="chat with the model on stdin/stdout")
    chat.add_argument("--system", default=None, help="a system message")
    for sub in (generate, chat):
        add_engine_args(sub)
        add_sampling_args(sub)
    serve = commands.add_parser("serve", help="run the OpenAI-compatible server")
    serve.add_argument("model_tag", nargs="?", default=None, help="model to serve (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 serves the network)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None, help="model name(s) clients use")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or KVSERVE_API_KEY)")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="let the model decide to call tools (tool_choice auto); needs --tool-call-parser")
    serve.add_argument("--tool-call-parser", default=None,
                       help="how the model writes tool calls: hermes, llama3_json, mistral, pythonic, or a plugin's")
    limit_args(serve)
    add_engine_args(serve)
    commands.add_parser("plugins", help="list discovered plugins and the platform that would be used")
    conformance = commands.add_parser("conformance", help="check a platform plugin against kvserve's references")
    conformance.add_argument("platform", help="the platform's name, as `kvserve plugins` lists it")
    conformance.add_argument("pytest_args", nargs=argparse.REMAINDER, help="more pytest arguments (-k, -x, ...)")
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="benchmark", required=True)
    serving_bench.add_parser(bench)
    latency_bench.add_parser(bench, add_engine_args)
    throughput_bench.add_parser(bench, add_engine_args)
    args = parser.parse_args(argv)
    handler = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "plugins": cmd_plugins,
               "conformance": cmd_conformance, "bench": lambda a: a.bench(a)}[args.command]
    try:
        return handler(args) or 0
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
