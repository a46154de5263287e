"""The CUDA and ROCm platforms: registered through entry points like any vendor's, and each says why it is
unavailable where its GPU (or torch build) is missing; on a GPU, the engine's greedy tokens equal the CPU
platform's."""
from __future__ import annotations

import pytest
import torch

from kvserve.plugins.manager import PluginManager

VENDOR = "rocm" if torch.version.hip else "cuda"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA or ROCm device")


def test_both_gpu_platforms_register_and_report_their_state():
    manager = PluginManager()
    records = {r.name: r for r in manager.platform_records()}
    assert {"cuda", "rocm"} <= set(records)
    other = records["cuda" if VENDOR == "rocm" else "rocm"].info
    assert not other.available
    assert ("without CUDA or ROCm" if torch.version.cuda is None and not torch.version.hip
            else f"use the {VENDOR} platform") in other.unavailable_reason
    mine = records[VENDOR]
    if torch.cuda.is_available():
        assert mine.info.available and mine.info.priority > records["cpu"].info.priority
        assert {"device", "arch", "memory", "kernels"} <= set(mine.info.details)
        assert manager.select_platform().name == VENDOR
    else:
        assert mine.status.startswith("unavailable: ")
        with pytest.raises(ValueError, match=f"platform '{VENDOR}' is unavailable: "):
            manager.select_platform(VENDOR)
        assert manager.select_platform().name == "cpu"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("architecture", ["llama-tied-gqa", "qwen2"])
# fp8: torch._scaled_mm on sm89+ / MI300+, else the Triton scaled GEMM, which int8 takes everywhere
@pytest.mark.parametrize("quantization", [None, "fp8", "int8"])
def test_greedy_tokens_equal_the_cpu_platform_in_float32(tiny_model, architecture, quantization):
    from kvserve import LLM, SamplingParams

    prompts = [[5, 17, 42] * 11, [7], [9, 10, 11, 12]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tokens = {}
    for device in ("cpu", VENDOR):
        llm = LLM(tiny_model(architecture), dtype="float32", device=device, kv_cache_memory="64MiB",
                  max_num_batched_tokens=16, max_num_seqs=4, quantization=quantization)
        assert llm.llm_engine.platform.name == device
        tokens[device] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens[VENDOR] == tokens["cpu"]
