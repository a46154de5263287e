"""vLLM's LLM / EngineArgs keywords that kvserve has no option for, as code copied from vLLM passes them."""
from __future__ import annotations

from kvserve.core.sampling_params import MAX_LOGPROBS

_GRAPHS = "the platform chooses the batch sizes its graphs capture; enforce_eager=True runs without graphs"
_SPECULATION = "use speculative_config={'method': 'draft_model', 'model': ..., 'num_speculative_tokens': n}"
# vLLM's LLM / EngineArgs keywords that kvserve has no option for: the values that ask for what kvserve does anyway
# (vLLM's defaults, which copied code often passes), and why others are refused.
VLLM_KEYWORDS: dict[str, tuple[tuple, str]] = {
    "gpu_memory_utilization": ((), "kvserve sizes the KV cache in bytes, not as a share of device memory: set "
                                   "kv_cache_memory (like '4GiB'; default: the platform's, 4GiB on CPUs)"),
    "max_seq_len_to_capture": ((), _GRAPHS),
    "compilation_config": ((None,), _GRAPHS),
    "worker_use_ray": ((False,), "use distributed_executor_backend='ray'"),
    "disable_log_stats": ((True,), "kvserve logs no periodic stats; the server's /metrics has them"),
    "cpu_offload_gb": ((0,), "kvserve keeps all the weights in the device's memory"),
    "skip_tokenizer_init": ((False,), "kvserve always loads the tokenizer"),
    "hf_token": ((None,), "huggingface_hub reads the token from HF_TOKEN, or from `hf auth login`"),
    "hf_overrides": ((None, {}), "edit the model's config.json instead"),
    "max_logprobs": ((MAX_LOGPROBS,), f"kvserve returns at most {MAX_LOGPROBS} logprobs per token"),
    "disable_sliding_window": ((False,), "models run with the sliding window their config gives"),
    "enable_sleep_mode": ((False,), "sleep mode is not supported"),
    "limit_mm_per_prompt": ((None,), "kvserve runs text-only models"),
    "served_model_name": ((None,), "the server names its model: kvserve serve --served-model-name"),
    "speculative_model": ((None,), _SPECULATION),
    "num_speculative_tokens": ((None,), _SPECULATION),
    "guided_decoding_backend": ((None,), "it is called structured_outputs_backend"),
}
# vLLM's older keyword for what its runner option chooses now: each task's runner.
TASK_RUNNERS = {"auto": "auto", "generate": "generate", "embed": "pooling", "embedding": "pooling"}


def without_vllm_keywords(options: dict) -> dict:
    """``options`` less the vLLM keywords whose values ask for what kvserve does anyway, and with ``task`` as the
    runner it asks for; any other value of one is a ValueError that says why."""
    if "task" in options:
        options = {**options}
        task = options.pop("task")
        if task not in TASK_RUNNERS:
            raise ValueError(f"task={task!r} is vLLM's, and kvserve takes only {', '.join(map(repr, TASK_RUNNERS))}: "
                             f"it generates, or embeds with a pooling model (classify, score and reward are not "
                             f"supported)")
        runner = TASK_RUNNERS[task]
        if runner != "auto":
            if options.get("runner", "auto") not in ("auto", runner):
                raise ValueError(f"task={task!r} asks for runner={runner!r}, not runner={options['runner']!r}")
            options["runner"] = runner
    for name in sorted(options.keys() & VLLM_KEYWORDS.keys()):
        allowed, why = VLLM_KEYWORDS[name]
        if options[name] not in allowed:
            takes = f"takes only {' or '.join(map(repr, allowed))}" if allowed else "has no such option"
            raise ValueError(f"{name}={options[name]!r} is vLLM's, and kvserve {takes}: {why}")
    return {name: value for name, value in options.items() if name not in VLLM_KEYWORDS}
