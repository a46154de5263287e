"""`kvserve bench throughput`: offline throughput on a random token-id workload that other engines can replay."""
from __future__ import annotations

import argparse
import gc
import os
import time

import numpy as np


def parse_range(text: str) -> tuple[int, int]:
    """'64:256' -> (64, 256), both inclusive; '128' -> (128, 128)."""
    low, _, high = text.partition(":")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"a length range must look like 64:256 or 128, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"a length range needs 1 <= low <= high, got {text!r}")
    return bounds


def random_workload(num_prompts: int, input_len: tuple[int, int], seed: int,
                    shared_prefix_len: int = 0) -> list[list[int]]:
    """Token-id prompts drawn exactly as documented in docs/benchmarks.md; a shared prefix is drawn separately,
    so the per-request parts are the same with and without one."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(input_len[0], input_len[1] + 1, size=num_prompts)
    prompts = [rng.integers(1000, 30000, size=int(n)).tolist() for n in lens]
    if shared_prefix_len:
        prefix = np.random.default_rng(seed + 1).integers(1000, 30000, size=shared_prefix_len).tolist()
        prompts = [prefix + p for p in prompts]
    return prompts


def run(llm, model: str, prompts: list[list[int]], output_len: int, structured_outputs=None,
        show_progress: bool = False, with_breakdown: bool = False, lora_requests: list | None = None) -> dict:
    """Greedy generation of exactly ``output_len`` tokens per prompt (each under ``structured_outputs``, if
    given, and with its adapter of ``lora_requests``), timed once the KV cache is resident and after an untimed
    warm-up, which runs the adapters too; ``with_breakdown`` adds where the time went (see ``breakdown``)."""
    from kvserve.core.bench.baselines import rates, warmup_prompts
    from kvserve.core.bench.breakdown import breakdown, machine_rates, time_steps
    from kvserve.core.bench.report import dtype_name
    from kvserve.core.engine.stats import engine_stats
    from kvserve.core.sampling_params import SamplingParams

    engine = llm.llm_engine
    timed = time_steps(engine) if with_breakdown else None
    engine.runner.wait_for_kv_cache()
    warmup = warmup_prompts(prompts)
    llm.generate(warmup, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False,
                 lora_request=None if lora_requests is None else lora_requests[:len(warmup)])
    if timed is not None:
        machine = machine_rates(timed.dtype)
        timed.steps.clear()
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True,
                            structured_outputs=structured_outputs)
    before = engine_stats(engine)   # one engine's, or summed over a data-parallel engine's replicas
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=show_progress, lora_request=lora_requests)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    if generated != len(prompts) * output_len:
        raise RuntimeError(f"generated {generated} tokens, expected {len(prompts) * output_len}")
    after = engine_stats(engine)
    queries = after.prefix_queries - before.prefix_queries
    extra = {} if timed is None else {"breakdown": breakdown(timed, elapsed, machine)}
    return {"engine": "kvserve", "model": model,
            "dtype": dtype_name(engine.runner.dtype), **rates(elapsed, prompts, output_len),
            "requests": len(prompts), "requests_per_s": round(len(prompts) / elapsed, 3),
            "prompt_tokens": sum(map(len, prompts)), "output_tokens": generated,
            "prompt_tokens_computed": after.prompt_tokens - before.prompt_tokens,
            "prefix_cache_hit_rate": round((after.prefix_hits - before.prefix_hits) / queries, 3) if queries else 0.0,
            **extra}


def constrained_run(llm, model: str, prompts: list[list[int]], output_len: int, show_progress: bool = False) -> dict:
    """``run`` with every request under one JSON schema whose outputs are longer than ``output_len`` tokens (a
    list of at least that many digits), on the prompts with their first token changed so that the prefix cache
    holds none of them, and the schema's compile times: the backend's start (its tokenizer tables), the schema's
    first compile, and a cached one."""
    from kvserve.core.structured_outputs import StructuredOutputsParams

    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": output_len}
    constraint, grammars = StructuredOutputsParams(json=schema), llm.llm_engine.grammars
    times = []
    for first in (StructuredOutputsParams(json_object=True), constraint, constraint):
        start = time.perf_counter()
        grammars.compile(first)
        times.append(round(time.perf_counter() - start, 4))
    compile_s = dict(zip(("backend_start", "cold", "cached"), times))
    uncached = [[prompt[0] + 1] + prompt[1:] for prompt in prompts]
    return {**run(llm, model, uncached, output_len, constraint, show_progress), "compile_s": compile_s}


def lora_run(args, model: str, prompts: list[list[int]]) -> dict:
    """The workload with each prompt under one of ``args.lora_adapters`` in turn, on the engine ``args`` describe;
    then on the base model alone, in an engine without LoRA; and the ratio of their output rates."""
    from kvserve.core.entrypoints.cli import build_llm
    from kvserve.core.lora.request import LoRARequest

    if not args.enable_lora:
        raise ValueError("--lora-adapters runs adapters: add --enable-lora (and --max-loras N to run N at once)")
    adapters = [LoRARequest(f"adapter-{i}", i + 1, path) for i, path in enumerate(args.lora_adapters)]
    requests = [adapters[i % len(adapters)] for i in range(len(prompts))]
    llm = build_llm(args)
    mixed = run(llm, model, prompts, args.output_len, show_progress=not args.disable_tqdm, lora_requests=requests)
    del llm
    gc.collect()
    base = run(build_llm(argparse.Namespace(**{**vars(args), "enable_lora": False})), model, prompts,
               args.output_len, show_progress=not args.disable_tqdm)
    return {**mixed, "adapters": len(adapters), "base_model_alone": base,
            "lora_ratio": round(mixed["output_tok_s"] / base["output_tok_s"], 2)}


def add_parser(commands, add_engine_args) -> None:
    parser = commands.add_parser("throughput", help="offline throughput on a random token-id workload")
    parser.add_argument("--dataset", default="random", choices=["random"])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", default="64:256", help="prompt length range lo:hi, inclusive")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--shared-prefix-len", type=int, default=0, help="a common prefix of this many tokens")
    parser.add_argument("--baseline", choices=["hf", "vllm", "llama.cpp"], default=None,
                        help="also run Hugging Face transformers (hf), vLLM or llama.cpp (a .gguf model) on the same "
                             "workload, and report the ratio")
    parser.add_argument("--baseline-python", default=None,
                        help="with --baseline vllm or llama.cpp: the python of a venv with vLLM or llama-cpp-python")
    parser.add_argument("--json-schema", action="store_true",
                        help="also run the workload with every request under a JSON schema, and report the ratio")
    parser.add_argument("--breakdown", action="store_true",
                        help="also report the time in prefill steps, in decode steps and elsewhere, each kind of step "
                             "against its bound at this machine's matmul and memory-read rates, measured first")
    parser.add_argument("--lora-adapters", nargs="+", default=None, metavar="PATH",
                        help="run each prompt with one of these PEFT LoRA adapters in turn (with --enable-lora), then "
                             "the base model alone in an engine without LoRA, and report the ratio")
    parser.add_argument("--output-json", default=None, help="also write the results to this file")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar for the timed run")
    add_engine_args(parser)   # its --seed seeds the workload too, as in vLLM's benchmarks

    def bench(args) -> None:
        from kvserve.core.bench import baselines
        from kvserve.core.bench.report import emit
        from kvserve.core.entrypoints.cli import build_llm
        from kvserve.core.loader.model_loader import default_model_path

        for name, low in (("num_prompts", 1), ("output_len", 1), ("shared_prefix_len", 0)):
            if getattr(args, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
        package = {"vllm": "vLLM", "llama.cpp": "llama-cpp-python"}.get(args.baseline)
        if package and not args.baseline_python:
            raise ValueError(f"--baseline {args.baseline} needs --baseline-python, the python of a venv with "
                             f"{package} installed")
        if args.baseline_python and not package:
            raise ValueError("--baseline-python is only used with --baseline vllm or llama.cpp")
        if args.baseline_python and not os.path.isfile(args.baseline_python):
            raise ValueError(f"--baseline-python {args.baseline_python!r} is not a file; pass the python of a "
                             f"venv with {package} installed")
        model_path = args.model or default_model_path()
        if args.baseline == "llama.cpp" and not model_path.endswith(".gguf"):
            raise ValueError(f"--baseline llama.cpp runs a .gguf file, and the model is {model_path!r}")
        prompts = random_workload(args.num_prompts, parse_range(args.input_len), args.seed, args.shared_prefix_len)
        split = [f"--{n.replace('_', '-')} {getattr(args, n)}" for n in
                 ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size") if getattr(args, n) > 1]
        if args.breakdown and split:
            raise ValueError(f"--breakdown times the steps of one engine in this process; run it without "
                             f"{' and '.join(split)}")
        others = [f"--{name}" for name in ("baseline", "json_schema", "breakdown") if getattr(args, name)]
        if args.lora_adapters and others:
            raise ValueError(f"--lora-adapters compares with the base model alone; run it without {', '.join(others)}")
        workload = {"workload": {k: getattr(args, k) for k in (
            "dataset", "num_prompts", "input_len", "output_len", "shared_prefix_len", "seed")}}
        if args.lora_adapters:
            return emit({**workload, **lora_run(args, model_path, prompts)}, args.output_json)
        llm = build_llm(args)
        result = {**workload, **run(llm, model_path, prompts, args.output_len, show_progress=not args.disable_tqdm,
                                    with_breakdown=args.breakdown)}
        if args.json_schema:
            result["json_schema"] = constrained_run(llm, model_path, prompts, args.output_len, not args.disable_tqdm)
            result["json_schema_ratio"] = round(result["json_schema"]["output_tok_s"] / result["output_tok_s"], 2)
        engine = llm.llm_engine
        dtype = engine.runner.dtype
        if args.baseline == "hf":
            result["baseline"] = baselines.run_hf(model_path, dtype, prompts, args.output_len)
        elif args.baseline == "vllm":
            result["baseline"] = baselines.run_vllm(args.baseline_python, model_path, dtype, prompts,
                                                    args.output_len, engine.max_model_len)
        elif args.baseline == "llama.cpp":
            result["baseline"] = baselines.run_llama_cpp(args.baseline_python, model_path, prompts, args.output_len)
        if args.baseline:
            result["speedup"] = round(result["output_tok_s"] / result["baseline"]["output_tok_s"], 2)
        emit(result, args.output_json)

    parser.set_defaults(bench=bench)
