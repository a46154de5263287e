"""The engine end to end on the GPU platforms' Triton attention, fused ops and quantized GEMMs: on CPU tensors
under Triton's interpreter (conftest chooses it without a GPU), through a platform registered for the test, greedy
tokens equal the CPU platform's in float32, across chunked prefill, a prefix-cache hit and decodes."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.triton, pytest.mark.slow]
pytest.importorskip("triton")
from kvserve.core.config import build_engine_config  # noqa: E402
from kvserve.core.engine.llm_engine import LLMEngine  # noqa: E402
from kvserve.core.sampling_params import SamplingParams  # noqa: E402
from kvserve.platforms.cpu import plugin as cpu  # noqa: E402
from kvserve.plugins.hookspecs import hookimpl  # noqa: E402
from kvserve.plugins.interfaces import PlatformInfo  # noqa: E402
from kvserve.plugins.manager import PluginManager  # noqa: E402

# The second round's prompt finds the first round's first prompt's two full blocks in the prefix cache.
ROUNDS = [[[5, 17, 42] * 11, [7], [9, 10, 11, 12]], [[5, 17, 42] * 11 + [3]]]


class TritonOnCpu:
    """The CPU platform with the GPU platforms' Triton attention and fused ops."""

    @hookimpl
    def platform_detect(self) -> PlatformInfo:
        return PlatformInfo(name="triton-cpu", device_type="cpu", priority=-1, supported_dtypes=(torch.float32,))

    platform_update_config = staticmethod(cpu.platform_update_config)
    platform_memory_info = staticmethod(cpu.platform_memory_info)

    @hookimpl
    def platform_attention_backend(self, spec):
        from kvserve.platforms.cuda.attention import TritonPagedAttention

        return TritonPagedAttention

    @hookimpl
    def platform_ops(self) -> dict:
        from kvserve.kernels_cuda.fused_ops import FUSED_OPS

        return FUSED_OPS

    @hookimpl
    def platform_quant_kernel(self, weight):
        from kvserve.kernels_cuda.quant_gemm import grouped_gemm
        from kvserve.kernels_cuda.scaled_gemm import scaled_gemm
        from kvserve.plugins.interfaces import GROUPED_BITS

        return grouped_gemm(weight) if weight.scheme in GROUPED_BITS else scaled_gemm(weight)


def greedy_tokens(path: str, device: str, manager: PluginManager, kv_cache_dtype: str = "auto",
                  quantization: str | None = None, speculative_config: dict | None = None,
                  adapters: list | None = None) -> list[list[int]]:
    """``adapters``: each round's i-th prompt runs with adapters[i % len(adapters)] (None: the base model)."""
    lora = dict(enable_lora=True, max_loras=len(adapters)) if adapters else {}
    config = build_engine_config(path, dtype="float32", device=device, kv_cache_memory="16MiB",
                                 max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=True,
                                 kv_cache_dtype=kv_cache_dtype, quantization=quantization,
                                 speculative_config=speculative_config, **lora)
    engine = LLMEngine(config, plugins=manager)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = []
    for prompts in ROUNDS:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params, lora_request=adapters[i % len(adapters)] if adapters else None)
        finished = {}
        while engine.has_unfinished_requests():
            finished.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        tokens += [finished[str(i)] for i in range(len(prompts))]
    assert engine.block_manager.prefix_hits > 0
    assert speculative_config is None or engine.spec_verifications > 0
    return tokens


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_greedy_tokens_equal_the_cpu_platform(tiny_model, kv_cache_dtype):
    manager = PluginManager()
    manager.register(TritonOnCpu(), "triton-cpu")
    path = tiny_model("llama-tied-gqa")   # grouped-query attention: 4 heads over 2 kv heads
    assert (greedy_tokens(path, "triton-cpu", manager, kv_cache_dtype)
            == greedy_tokens(path, "cpu", manager, kv_cache_dtype))


@pytest.mark.parametrize("checkpoint", ["gptq", "gptq-8bit-desc-act", "awq"])
def test_quantized_checkpoints_give_the_cpu_platforms_greedy_tokens(tiny_model, tmp_path, checkpoint):
    import quant_packers

    manager = PluginManager()
    manager.register(TritonOnCpu(), "triton-cpu")
    path = quant_packers.write_checkpoint(tiny_model("llama-tied-gqa"), checkpoint, tmp_path / checkpoint)
    assert greedy_tokens(path, "triton-cpu", manager) == greedy_tokens(path, "cpu", manager)


@pytest.mark.parametrize("quantization", ["int8", "fp8"])   # W8A8, inputs per token: the Triton scaled GEMM
def test_online_8_bit_weights_give_the_cpu_platforms_greedy_tokens(tiny_model, quantization):
    manager = PluginManager()
    manager.register(TritonOnCpu(), "triton-cpu")
    path = tiny_model("llama-tied-gqa")
    assert (greedy_tokens(path, "triton-cpu", manager, quantization=quantization)
            == greedy_tokens(path, "cpu", manager, quantization=quantization))


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_verifying_speculated_tokens_gives_the_cpu_platforms_greedy_tokens(tiny_model, method):
    # The proposals go through the Triton decode kernel as one query per position, sharing a block table; a
    # draft model (the target itself here) runs on the Triton backend too.
    manager = PluginManager()
    manager.register(TritonOnCpu(), "triton-cpu")
    path = tiny_model("llama-tied-gqa")
    config = {"method": method, "num_speculative_tokens": 3, **({"model": path} if method == "draft_model" else {})}
    assert (greedy_tokens(path, "triton-cpu", manager, speculative_config=config)
            == greedy_tokens(path, "cpu", manager))


def test_adapters_give_the_cpu_platforms_greedy_tokens(tiny_model, tmp_path):
    """The base model and two adapters in the same steps: the adapters' stacked matmuls on torch's linear (the GPU
    platforms leave platform_linear_kernel to torch) beside the Triton attention and fused ops."""
    from lora_adapters import ALL_PROJECTIONS, save_adapter

    from kvserve import LoRARequest

    manager = PluginManager()
    manager.register(TritonOnCpu(), "triton-cpu")
    path = tiny_model("llama-tied-gqa")
    adapters = [None, *(LoRARequest(f"a{i}", i, save_adapter(path, str(tmp_path / f"a{i}"), i, ALL_PROJECTIONS)[0])
                        for i in (1, 2))]
    with_adapters = greedy_tokens(path, "triton-cpu", manager, adapters=adapters)
    assert with_adapters == greedy_tokens(path, "cpu", manager, adapters=adapters)
    assert with_adapters != greedy_tokens(path, "cpu", manager)   # the adapters change what the model says
