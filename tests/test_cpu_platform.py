"""The CPU platform's attention backends against a direct reference, and the backend choice."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from kvserve.kernels_cpu import native
from kvserve.platforms.cpu.attention import NativePagedAttention, TorchPagedAttention
from kvserve.platforms.cpu.ipex_attention import ipex_unavailable_reason
from kvserve.plugins.interfaces import AttentionSpec, StepLayout
from kvserve.plugins.manager import PluginManager


def reference_attention(q, k, v, scale, window):
    """One sequence: q [n, heads, d] are the last n of the k/v [ctx, kv_heads, d] positions."""
    n, ctx, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(ctx - n, ctx)[:, None]
    k_pos = torch.arange(ctx)[None, :]
    allowed = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def spec(**overrides) -> AttentionSpec:
    return AttentionSpec(**{"num_heads": 8, "num_kv_heads": 2, "head_size": 64, "dtype": torch.float32,
                            "block_size": 16, **overrides})


# (tokens already cached, new tokens) per sequence, decodes first: a decode, a whole prompt, a chunk after
# cached context; the second batch has whole prompts only, which take the causal path over their own keys; the
# last has prompts longer than the native kernel's 16-query tiles.
@pytest.mark.parametrize("shapes", [[(9, 1), (0, 1), (0, 7), (5, 6)], [(20, 1), (0, 7), (0, 3)], [(0, 5), (0, 9)],
                                    [(3, 1), (30, 1)], [(40, 1), (0, 40), (20, 37)]])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("head_size, block_size", [(8, 4), (64, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend_cls", [TorchPagedAttention, NativePagedAttention])
def test_paged_attention_matches_reference(shapes, window, head_size, block_size, dtype, backend_cls):
    if native.load()[1] and backend_cls is NativePagedAttention:
        pytest.skip(f"native kernels unavailable: {native.load()[1]}")
    torch.manual_seed(0)
    attention_spec = spec(num_heads=6, head_size=head_size, block_size=block_size, sliding_window=window, dtype=dtype)
    backend = backend_cls(attention_spec, torch.device("cpu"))
    num_blocks = 40
    cache = torch.zeros(backend.kv_cache_shape(num_blocks, block_size, 2, head_size), dtype=dtype)
    free = torch.randperm(num_blocks).tolist()
    queries, keys, values, expected, tables = [], [], [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        k, v = torch.randn(total, 2, head_size, dtype=dtype), torch.randn(total, 2, head_size, dtype=dtype)
        old = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(cached)],
                           dtype=torch.int64)
        backend.store_kv(k[:cached], v[:cached], cache, old)
        q = torch.randn(new, 6, head_size, dtype=dtype)
        queries.append(q), keys.append(k[cached:]), values.append(v[cached:]), tables.append(table)
        expected.append(reference_attention(q.float(), k.float(), v.float(), 0.3, window).to(dtype))
    num_decodes = sum(1 for cached, new in shapes if new == 1 and cached)
    layout = StepLayout(query_lens=[n for _, n in shapes], seq_lens=[c + n for c, n in shapes],
                        block_tables=tables, num_decodes=num_decodes)
    out = backend.forward(torch.cat(queries), torch.cat(keys), torch.cat(values), cache,
                          backend.build_metadata(layout), 0.3)
    # bfloat16: the torch kernel rounds probabilities to bfloat16 before multiplying by values.
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, torch.cat(expected), rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(shutil.which("c++") is None or os.environ.get(native.DISABLE_ENV) == "0",
                    reason="no C++ compiler, or native kernels disabled")
def test_native_kernels_build_where_a_compiler_is_present():
    # Every native test skips when the build fails: this one makes a broken build fail the suite.
    assert native.load()[0] is not None, native.load()[1]


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
