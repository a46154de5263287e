"""The CPU platform's attention: the torch kernel against a direct reference, and the backend choice."""
from __future__ import annotations

import pytest
import torch

from kvserve.kernels_cpu.paged_attention import store_kv, varlen_paged_attention
from kvserve.platforms.cpu.ipex_attention import ipex_unavailable_reason
from kvserve.plugins.interfaces import AttentionSpec
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


@pytest.mark.parametrize("window", [None, 5])
def test_varlen_paged_attention_matches_reference(window):
    torch.manual_seed(0)
    heads, kv_heads, d, block_size, num_blocks = 6, 2, 8, 4, 40
    cache = torch.zeros(2, num_blocks, block_size, kv_heads, d)
    # (tokens already cached, new tokens): a decode, a first prefill, a chunk after cached context
    shapes = [(9, 1), (0, 7), (5, 6)]
    free = list(torch.randperm(num_blocks).tolist())
    queries, expected, tables, seq_lens = [], [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        k, v = torch.randn(total, kv_heads, d), torch.randn(total, kv_heads, d)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(total)])
        store_kv(k, v, cache, slots)
        q = torch.randn(new, heads, d)
        queries.append(q)
        expected.append(reference_attention(q, k, v, 0.3, window))
        tables.append(table + [0] * (4 - len(table)))
        seq_lens.append(total)
    lens = torch.tensor([n for _, n in shapes])
    starts = torch.nn.functional.pad(lens.cumsum(0), (1, 0))
    out = varlen_paged_attention(torch.cat(queries), cache, starts, torch.tensor(seq_lens), torch.tensor(tables),
                                 int(lens.max()), max(seq_lens), 0.3, window)
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)


def spec(**overrides) -> AttentionSpec:
    return AttentionSpec(**{"num_heads": 8, "num_kv_heads": 2, "head_size": 64, "dtype": torch.float32,
                            "block_size": 16, **overrides})


def test_backend_choice_and_override(monkeypatch):
    platform = PluginManager().select_platform("cpu")
    expected = "ipex-paged" if not ipex_unavailable_reason() else "torch-paged"
    assert platform.attention_backend(spec()).name == expected
    monkeypatch.setenv("KVSERVE_ATTENTION_BACKEND", "torch-paged")
    assert platform.attention_backend(spec()).name == "torch-paged"
    monkeypatch.setenv("KVSERVE_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="'flash' is not a backend of this platform; allowed: ipex-paged, torch-paged"):
        platform.attention_backend(spec())
    monkeypatch.delenv("KVSERVE_ATTENTION_BACKEND")
    with pytest.raises(ValueError, match=r"ipex-paged: .*torch-paged: dtype torch.int8 is not"):
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
