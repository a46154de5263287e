"""Runs in the Python of a vLLM environment, never imported by kvserve: times vLLM's LLM.generate on token-id
prompts (greedy, exactly --output-len new tokens each) after one untimed warm-up on the first two prompts
reversed (so that a prefix cache does not hold the timed prompts), and prints one JSON line."""
import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--model", "--dtype", "--prompts"):
        parser.add_argument(name, required=True)
    parser.add_argument("--output-len", type=int, required=True)
    parser.add_argument("--max-model-len", type=int, required=True)
    args = parser.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.prompts) as f:
        token_ids = json.load(f)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in token_ids]
    warmup = [TokensPrompt(prompt_token_ids=ids[::-1]) for ids in token_ids[:2]]
    # On CPU, gpu_memory_utilization is the fraction of host memory vLLM reserves (default 0.92, which fails
    # whenever anything else holds memory); half leaves the KV cache far more room than the workload uses.
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
              gpu_memory_utilization=0.5)
    llm.generate(warmup, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    print(json.dumps({"elapsed_s": elapsed, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}))


if __name__ == "__main__":
    main()
