"""The CPU platform's attention backends against a direct reference, and the backend choice."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from kvserve import LLM
from kvserve.conformance.attention import NUM_HEADS, NUM_KV_HEADS, SHAPES, check_against_reference
from kvserve.kernels_cpu import native
from kvserve.platforms.cpu.attention import NativePagedAttention
from kvserve.platforms.cpu.ipex_attention import ipex_unavailable_reason
from kvserve.plugins.interfaces import AttentionSpec
from kvserve.plugins.manager import PluginManager
from kvserve.plugins.torch_attention import TorchPagedAttention


def spec(**overrides) -> AttentionSpec:
    return AttentionSpec(**{"num_heads": 8, "num_kv_heads": 2, "head_size": 64, "dtype": torch.float32,
                            "block_size": 16, **overrides})


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("window", [None, 5])
# Heads of 64 and 128 (in blocks of 16 and 32 positions) take AMX tiles for prefill chunks on CPUs that have them;
# 80 (not whole tile rows of 32) and blocks of 4 stay on vectors.
@pytest.mark.parametrize("head_size, block_size", [(8, 4), (64, 16), (128, 32), (80, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend_cls", [TorchPagedAttention, NativePagedAttention])
def test_paged_attention_matches_reference(shapes, window, head_size, block_size, dtype, backend_cls):
    if native.load()[1] and backend_cls is NativePagedAttention:
        pytest.skip(f"native kernels unavailable: {native.load()[1]}")
    attention_spec = spec(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_size=head_size,
                          block_size=block_size, sliding_window=window, dtype=dtype)
    check_against_reference(backend_cls(attention_spec, torch.device("cpu")), shapes, head_size, block_size, dtype,
                            window)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("window", [None, 5])
def test_decodes_of_wide_head_groups_match_reference(shapes, window):
    # 8 query heads a kv head: a decode's 8 rows take AMX tiles on CPUs that have them.
    if native.load()[1]:
        pytest.skip(f"native kernels unavailable: {native.load()[1]}")
    attention_spec = spec(num_heads=16, num_kv_heads=2, sliding_window=window, dtype=torch.bfloat16)
    check_against_reference(NativePagedAttention(attention_spec, torch.device("cpu")), shapes, 64, 16,
                            torch.bfloat16, window)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend_cls", [TorchPagedAttention, NativePagedAttention])
def test_soft_capped_scores_match_reference(shapes, window, dtype, backend_cls):
    # A cap of 2 on scores of about +-3: the softmax differs from the uncapped one's.
    if native.load()[1] and backend_cls is NativePagedAttention:
        pytest.skip(f"native kernels unavailable: {native.load()[1]}")
    attention_spec = spec(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, sliding_window=window, dtype=dtype,
                          logits_soft_cap=2.0)
    check_against_reference(backend_cls(attention_spec, torch.device("cpu")), shapes, 64, 16, dtype, window)


@pytest.mark.skipif(shutil.which("c++") is None or os.environ.get(native.DISABLE_ENV) == "0",
                    reason="no C++ compiler, or native kernels disabled")
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("head_size, block_size", [(8, 4), (64, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend_cls", [TorchPagedAttention, NativePagedAttention])
def test_fp8_caches_attend_keys_and_values_as_they_hold_them(shapes, cache_dtype, head_size, block_size, dtype,
                                                             backend_cls):
    if native.load()[1] and backend_cls is NativePagedAttention:
        pytest.skip(f"native kernels unavailable: {native.load()[1]}")
    attention_spec = spec(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_size=head_size,
                          block_size=block_size, dtype=dtype, kv_cache_dtype=cache_dtype)
    check_against_reference(backend_cls(attention_spec, torch.device("cpu")), shapes, head_size, block_size, dtype,
                            None, cache_dtype=cache_dtype)


@pytest.mark.skipif(shutil.which("c++") is None or os.environ.get(native.DISABLE_ENV) == "0",
                    reason="no C++ compiler, or native kernels disabled")
def test_native_kernels_build_where_a_compiler_is_present():
    # Every native test skips when the build fails: this one makes a broken build of any part fail the suite.
    for part in native.PARTS:
        assert native.load(part)[0] is not None, f"{part}: {native.load(part)[1]}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None or os.environ.get(native.DISABLE_ENV) == "0",
                    reason="no C++ compiler, or native kernels disabled")
def test_a_process_that_ends_during_a_background_build_completes_it(tmp_path):
    # A build cut off would leave torch's lock file behind, and every later start would wait on it forever.
    script = "from kvserve.kernels_cpu import native; native.build_in_background('fp8')"
    subprocess.run([sys.executable, "-c", script], env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
                   check=True, timeout=600)
    name = native.extension_name("fp8")
    assert (tmp_path / name / f"{name}.so").is_file()
    assert not (tmp_path / name / "lock").exists()


def test_backend_choice_and_override(monkeypatch):
    platform = PluginManager().select_platform("cpu")
    order = [name for name, unavailable in [("ipex-paged", ipex_unavailable_reason()),
                                            ("cpu-native", native.load()[1]), ("torch-paged", "")] if not unavailable]
    assert platform.attention_backend(spec()).name == order[0]
    monkeypatch.setenv("KVSERVE_ATTENTION_BACKEND", "torch-paged")
    assert platform.attention_backend(spec()).name == "torch-paged"
    monkeypatch.setenv("KVSERVE_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="'flash' is not a backend of this platform; allowed: ipex-paged, cpu-native, torch-paged"):
        platform.attention_backend(spec())
    monkeypatch.delenv("KVSERVE_ATTENTION_BACKEND")
    with pytest.raises(ValueError, match=r"ipex-paged: .*cpu-native: .*torch-paged: dtype torch.int8 is not"):
        platform.attention_backend(spec(dtype=torch.int8))


@pytest.mark.skipif(bool(ipex_unavailable_reason()), reason=ipex_unavailable_reason() or "ipex present")
def test_ipex_backend_matches_torch_backend(tiny_model, monkeypatch):
    from kvserve import LLM, SamplingParams

    path = tiny_model("llama-head64")
    prompts = [[5, 17, 42] * 11, [7], [9, 10, 11, 12]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def run(backend):
        monkeypatch.setenv("KVSERVE_ATTENTION_BACKEND", backend)
        llm = LLM(path, dtype="float32", kv_cache_memory="16MiB", max_num_batched_tokens=16)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert run("ipex-paged") == run("torch-paged")


def test_a_load_names_the_kernels_it_runs_on(tiny_model, caplog):
    """The kernels each say what they were built to run on; on this CPU that follows from its flags."""
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    native.announce.cache_clear()
    with caplog.at_level(logging.INFO, logger="kvserve"):
        LLM(tiny_model("llama-tied-gqa"), dtype="bfloat16", kv_cache_memory="8MiB")
    lines = [record.getMessage() for record in caplog.records]
    if not {"avx512_bf16", "avx512bw", "avx512vl"} <= flags:   # oneDNN's, or torch's linear without it
        assert not any("kvserve's bf16 kernel" in line for line in lines), lines
        return
    amx_tiles = {"amx_bf16", "amx_tile"} <= flags
    amx = "AMX-BF16 from 16 rows, AVX512-BF16 below" if amx_tiles else "AVX512-BF16"
    assert f"bfloat16 linear layers: kvserve's bf16 kernel ({amx})" in lines, lines
    assert f"bfloat16 gate-up layers: kvserve's bf16 kernel with SiLU-and-mul ({amx})" in lines, lines
    attention = "AMX-BF16 for prefill chunks, AVX512-BF16 for decodes" if amx_tiles else "AVX512-BF16"
    assert f"attention: kvserve's paged attention kernel ({attention})" in lines, lines
