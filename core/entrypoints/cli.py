"""The ``kvserve`` command: generate, chat, plugins."""
from __future__ import annotations

import argparse
import sys

from kvserve.core.bench import latency as latency_bench
from kvserve.core.bench import serving as serving_bench
from kvserve.core.bench import throughput as throughput_bench
from kvserve.core.entrypoints.engine_args import add_engine_args, add_option_args, options_from_args
from kvserve.core.entrypoints.openai.limits import ServerLimits
from kvserve.core.entrypoints.openai.server_options import ServerOptions, options_from
from kvserve.core.options import class_options

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_EMBEDDING_NAME = "all-MiniLM-L6-v2"   # the default model of runner pooling


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--sampling-seed", type=int, default=None)


def build_llm(args):
    from kvserve.core.entrypoints.llm import LLM

    return LLM(args.model, **options_from_args(args))


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
    from kvserve.core.entrypoints.openai.tools import reply_parsers
    from kvserve.core.log import init_logging

    init_logging()
    model = args.model_tag or args.model
    config = build_engine_config(model, **options_from_args(args))
    server = options_from(ServerOptions, args)
    default_name = DEFAULT_EMBEDDING_NAME if config.model.runner == "pooling" else DEFAULT_SERVED_NAME
    names = server.served_model_name or [model or default_name]
    api_key = server.api_key or os.environ.get("KVSERVE_API_KEY") or None
    parsers = reply_parsers(server.enable_auto_tool_choice, server.tool_call_parser, args.reasoning_parser)
    if server.lora_modules and not config.lora.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    return serve(config, server.host, server.port, names, api_key, parsers, options_from(ServerLimits, args),
                 lora_modules=server.lora_adapters())


def cmd_plugins(args) -> None:
    from kvserve.core.models.registry import BUILTIN_MODELS
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
    print(f"\nnative model architectures: {', '.join(sorted({**BUILTIN_MODELS, **manager.models()}))}")
    print("other causal LMs that transformers implements run its modeling code on kvserve's KV cache and attention "
          "(model_impl auto or transformers)")


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


def build_parser() -> argparse.ArgumentParser:
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
    serve.add_argument("model_tag", nargs="?", default=None, help="model to serve: a folder, .gguf file or model id, "
                       "ORG/NAME[:QUANT] (default: SmolLM2-135M-Instruct)")
    add_option_args(serve, class_options(ServerOptions) + class_options(ServerLimits))
    add_engine_args(serve)
    commands.add_parser("plugins", help="list discovered plugins and the platform that would be used")
    conformance = commands.add_parser("conformance", help="check a platform plugin against kvserve's references")
    conformance.add_argument("platform", help="the platform's name, as `kvserve plugins` lists it")
    conformance.add_argument("pytest_args", nargs=argparse.REMAINDER, help="more pytest arguments (-k, -x, ...)")
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="benchmark", required=True)
    serving_bench.add_parser(bench)
    latency_bench.add_parser(bench, add_engine_args)
    throughput_bench.add_parser(bench, add_engine_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "plugins": cmd_plugins,
               "conformance": cmd_conformance, "bench": lambda a: a.bench(a)}[args.command]
    try:
        return handler(args) or 0
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
