"""`kvserve bench latency`: vLLM's `bench latency`: a batch of requests at a time (one by default) on the offline
engine, timing each one's first token and every later one."""
from __future__ import annotations

import time

from tqdm import tqdm

from kvserve.core.bench.report import dtype_name, emit, percentiles
from kvserve.core.bench.throughput import random_workload


def time_requests(engine, prompts: dict[str, list[int]], params) -> dict[str, list[float]]:
    """Seconds from adding the requests, together, to each of their output tokens."""
    engine.platform.synchronize()
    start = time.perf_counter()
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    stamps: dict[str, list[float]] = {request_id: [] for request_id in prompts}
    while engine.has_unfinished_requests():
        outputs = [output for output in engine.step() if output.request_id in stamps]
        engine.platform.synchronize()
        now = time.perf_counter()
        for output in outputs:
            # A speculating step may add several tokens: each gets the step's time.
            times = stamps[output.request_id]
            times += [now - start] * (len(output.outputs[0].token_ids) - len(times))
    return stamps


def spec_counts(engine) -> list[int]:
    """Speculation's verifications, proposed and accepted tokens, and accepted tokens at each position."""
    positions = range(engine.speculation.num_speculative_tokens if engine.speculation else 0)
    return [engine.spec_verifications, engine.spec_proposed_tokens, engine.spec_accepted_tokens,
            *(engine.spec_accepted_per_position[i] for i in positions)]


def run(llm, input_len: int, output_len: int, num_iters: int, num_warmup: int, seed: int, batch_size: int = 1,
        show_progress: bool = True, prompt_text: str | None = None) -> dict:
    from kvserve.core.sampling_params import SamplingParams

    engine = llm.llm_engine
    if engine.has_unfinished_requests():
        raise ValueError("bench latency needs an idle engine: it times its own requests only")
    engine.runner.wait_for_kv_cache()
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    ttfts, tpots, itls, e2els = [], [], [], []
    speculation = [0] * len(spec_counts(engine))   # the timed iterations' share of spec_counts
    for i in tqdm(range(num_warmup + num_iters), desc="iterations", disable=not show_progress):
        # Fresh prompts each iteration, so that the prefix cache never skips a prefill.
        prompts = {f"latency-{i}-{j}": prompt for j, prompt in enumerate(
            random_workload(batch_size, (input_len, input_len), seed + i) if prompt_text is None else
            [engine.inputs.tokenize(f"Request {i}-{j}.\n{prompt_text}") for j in range(batch_size)])}
        before = spec_counts(engine)
        batch = time_requests(engine, prompts, params)
        if i < num_warmup:
            continue
        speculation = [total + b - a for total, a, b in zip(speculation, before, spec_counts(engine))]
        for stamps in batch.values():
            ttfts.append(stamps[0])
            e2els.append(stamps[-1])
            if len(stamps) > 1:
                tpots.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
                itls += [b - a for a, b in zip(stamps, stamps[1:])]
    result = {"ttft_ms": percentiles(ttfts), "tpot_ms": percentiles(tpots), "itl_ms": percentiles(itls),
              "e2el_ms": percentiles(e2els)}
    if engine.speculation is not None:
        verifications, proposed, accepted, *per_position = speculation
        # vLLM's figures: proposed tokens accepted, tokens a verification yields (the accepted ones, plus one),
        # and how often each position's proposal was accepted
        result["speculation"] = {"verifications": verifications, "proposed_tokens": proposed,
                                 "accepted_tokens": accepted,
                                 "acceptance_rate": round(accepted / proposed, 4) if proposed else None,
                                 "mean_acceptance_length": round(1 + accepted / verifications, 3)
                                 if verifications else None,
                                 "acceptance_rate_per_position": [round(n / verifications, 4) if verifications
                                                                  else None for n in per_position]}
    return result


def add_parser(commands, add_engine_args) -> None:
    parser = commands.add_parser("latency", help="offline latency of one request at a time")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="generated tokens")
    parser.add_argument("--num-iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--num-iters-warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--batch-size", type=int, default=1, help="requests each iteration runs together")
    parser.add_argument("--prompt-file", default=None,
                        help="each request's prompt: this file's text after a line naming the request (so that the "
                             "prefix cache does not skip its prefill), instead of --input-len random tokens")
    parser.add_argument("--output-json", default=None, help="also save the result here as JSON")
    parser.add_argument("--disable-tqdm", action="store_true")
    add_engine_args(parser)   # its --seed seeds the prompts too

    def bench(args) -> None:
        from kvserve.core.entrypoints.cli import DEFAULT_SERVED_NAME, build_llm

        for name in ("input_len", "output_len", "num_iters", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.num_iters_warmup < 0:
            raise ValueError(f"--num-iters-warmup must be >= 0, got {args.num_iters_warmup}")
        if args.data_parallel_size > 1:
            raise ValueError("bench latency times one engine: data parallelism does not shorten a request; time "
                             "it with bench throughput or bench serve")
        prompt_text = None if args.prompt_file is None else read_prompt(args.prompt_file)
        llm = build_llm(args)
        engine = llm.llm_engine
        result = {"model": args.model or DEFAULT_SERVED_NAME, "platform": engine.platform.name,
                  "dtype": dtype_name(engine.runner.dtype), "prompt_file": args.prompt_file,
                  "input_len": args.input_len if prompt_text is None else len(engine.inputs.tokenize(prompt_text)),
                  "output_len": args.output_len, "batch_size": args.batch_size, "num_iters": args.num_iters,
                  "num_iters_warmup": args.num_iters_warmup, "seed": args.seed}
        result.update(run(llm, args.input_len, args.output_len, args.num_iters, args.num_iters_warmup, args.seed,
                          args.batch_size, not args.disable_tqdm, prompt_text))
        emit(result, args.output_json, "Latency Benchmark Result")

    parser.set_defaults(bench=bench)


def read_prompt(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--prompt-file {path!r} cannot be read as UTF-8 text: {error}") from None
    if not text.strip():
        raise ValueError(f"--prompt-file {path!r} is empty")
    return text
