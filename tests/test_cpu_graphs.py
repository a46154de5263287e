"""CPU graphs: decode steps replayed from a recording give the tokens eager steps give; what cannot be replayed
stays eager."""
from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.kernels_cpu import native
from kvserve.platforms.cpu.attention import NativePagedAttention
from kvserve.platforms.cpu.graphs import CpuGraphRunner
from kvserve.core.config import build_engine_config
from kvserve.plugins.interfaces import AttentionMetadata, AttentionSpec
from kvserve.plugins.manager import PluginManager
from kvserve.plugins.torch_attention import TorchPagedAttention

pytestmark = pytest.mark.skipif(native.load()[0] is None, reason=f"native kernels unavailable: {native.load()[1]}")


def generate(llm: LLM, prompts: list[list[int]], seed: int) -> list[list[int]]:
    # Requests of different lengths, so that the decode batch shrinks; one samples with its own seed.
    params = [SamplingParams(temperature=0, max_tokens=6 + 5 * i, ignore_eos=True) for i in range(len(prompts))]
    params[0] = SamplingParams(temperature=0.8, top_p=0.9, seed=seed, max_tokens=20, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("model, dtype", [("SmolLM2", "bfloat16"), ("qwen2", "float32"), ("mistral-sliding", "float32"),
                                          ("gemma2", "float32")])
def test_replayed_decode_steps_give_eager_tokens(smollm2_path, tiny_model, model, dtype):
    path = smollm2_path if model == "SmolLM2" else tiny_model(model)
    options = dict(dtype=dtype, kv_cache_memory="64MiB", max_model_len=256)
    graphs, eager = LLM(path, **options), LLM(path, enforce_eager=True, **options)
    assert eager.llm_engine.runner.graph_runner is None
    runner = graphs.llm_engine.runner.graph_runner
    assert isinstance(runner, CpuGraphRunner)
    prompts = [[(31 * i + 7 * j) % 300 + 5 for j in range(20 + 9 * i)] for i in range(4)]
    for seed in (0, 1):   # the second round replays every decode step from the first round's recordings
        assert generate(graphs, prompts, seed) == generate(eager, prompts, seed)
    assert sorted(runner.graphs) == [1, 2, 3, 4] and not runner.refused


class HostReadingModel(torch.nn.Module):
    """A forward whose Python reads a tensor value, which a recording would bake in."""

    def forward(self, input_ids, positions, metadata):
        return input_ids.float() * float(positions.max())


class PythonDataModel(torch.nn.Module):
    """A forward that builds a tensor from a host value of this step, which a recording would bake in."""

    def forward(self, input_ids, positions, metadata):
        return input_ids.float() * torch.tensor(metadata.max_seq_len - 1, dtype=torch.float32)


def metadata_for(positions: torch.Tensor) -> AttentionMetadata:
    count = len(positions)
    return AttentionMetadata(positions=positions, slot_mapping=positions, query_start_loc=torch.arange(count + 1),
                             seq_lens=positions + 1, block_tables=torch.zeros(count, 1, dtype=torch.int64),
                             num_decodes=count, max_query_len=1, max_seq_len=int(positions.max()) + 1)


class ValueShapedModel(torch.nn.Module):
    """A forward whose Python reads a shape that depends on values, which a recording would bake in."""

    def forward(self, input_ids, positions, metadata):
        return input_ids.float() * positions.nonzero().numel()


@pytest.mark.parametrize("model_cls, expected", [(HostReadingModel, [9.0, 18.0]), (PythonDataModel, [9.0, 18.0]),
                                                 (ValueShapedModel, [2.0, 4.0])])
def test_a_forward_reading_host_values_stays_eager(model_cls, expected):
    runner = CpuGraphRunner(model_cls())
    positions = torch.tensor([4, 9])
    assert runner.can_run(metadata_for(positions), 2)
    assert runner.run(torch.tensor([1, 2]), positions, metadata_for(positions)).tolist() == expected
    assert runner.refused == {2} and not runner.graphs
    assert not runner.can_run(metadata_for(positions), 2)   # the engine runs this size eagerly from now on
    assert runner.can_run(metadata_for(torch.tensor([4, 9, 11])), 3)


def test_only_decode_steps_of_replayable_backends_replay():
    platform = PluginManager().select_platform("cpu")
    attention = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=16, dtype=torch.float32, block_size=16)
    native_backend = NativePagedAttention(attention, torch.device("cpu"))
    torch_backend = TorchPagedAttention(attention, torch.device("cpu"))
    default, eager = build_engine_config("m"), build_engine_config("m", enforce_eager=True)
    assert isinstance(platform.graph_runner(HostReadingModel(), native_backend, default), CpuGraphRunner)
    assert platform.graph_runner(HostReadingModel(), torch_backend, default) is None
    assert platform.graph_runner(HostReadingModel(), native_backend, eager) is None
    prefill = metadata_for(torch.tensor([0, 1, 2]))
    prefill.num_decodes = 0
    assert not CpuGraphRunner(HostReadingModel()).can_run(prefill, 3)
