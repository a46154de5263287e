"""Platform plugins for real: out-of-tree packages installed with pip, selection, errors, and each CPU hook."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import run_python

from kvserve.core.config import CacheConfig, EngineConfig
from kvserve.core.layers.ops import REFERENCE_OPS, Ops
from kvserve.plugins import hookimpl
from kvserve.plugins.interfaces import (AttentionBackend, AttentionSpec, Communicator, MemoryInfo, PlatformInfo,
                                        StepLayout)
from kvserve.plugins.manager import PluginManager

PACKAGES = {"toy": "kvserve-toy-platform", "toy-models": "kvserve-toy-platform", "broken": "kvserve-broken-platform",
            "future": "kvserve-future-platform",
            **{name: "kvserve" for name in ("cpu", "cuda", "rocm", "xpu", "hpu", "npu")}}

FUTURE_STATUS = ("refused: built for plugin contract version 99; this kvserve supports versions 1, 2, 3 (install a "
                 "kvserve or a plugin release that match)")

DISCOVER = """
import json, os
from kvserve.plugins.manager import PluginManager
manager = PluginManager()
result = {"records": [dict(name=r.name, group=r.group, package=r.package, version=r.version, status=r.status)
                      for r in manager.records],
          "default": manager.select_platform().name}
os.environ["KVSERVE_PLATFORM"] = "nope"
try:
    manager.select_platform()
except ValueError as exc:
    result["missing"] = str(exc)
print(json.dumps(result))
"""

GENERATE = """
import json, sys
from kvserve.core.entrypoints.llm import LLM
from kvserve.core.sampling_params import SamplingParams
from kvserve_toy_platform.plugin import CALLS
prompts = ["The quick brown fox", "Once upon a time there was a tiny model that generated tokens one at a time.",
           "Paged attention stores keys and values in blocks.", "déjà vu, naïve café"]
params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
results = {}
cpu = {"device": "cpu", "kv_cache_memory": "32MiB"}
for run, extra in [("env", {}), ("device", {"device": "toy"}), ("cpu", cpu), ("toy-int8", {"quantization": "int8"}),
                   ("cpu-int8", {**cpu, "quantization": "int8"})]:
    before = dict(CALLS)
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16,
              **extra)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    engine = llm.llm_engine
    results[run] = dict(platform=engine.platform.name, backend=engine.runner.backend.name,
                        kv_cache_memory=engine.config.cache.kv_cache_memory,
                        tokens=[o.outputs[0].token_ids for o in outputs],
                        calls={k: CALLS[k] - before[k] for k in CALLS})
try:   # a backend that names no FP8 cache type is never handed one
    LLM(model=sys.argv[1], dtype="float32", max_model_len=128, kv_cache_dtype="fp8")
except ValueError as exc:
    results["toy-fp8"] = str(exc)
try:   # nor is one that does not cap scores chosen for a model that caps them
    LLM(model=sys.argv[2], dtype="float32", max_model_len=128)
except ValueError as exc:
    results["toy-gemma2"] = str(exc)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def discovery(plugin_site) -> dict:
    return json.loads(run_python(plugin_site, ["-c", DISCOVER]).splitlines()[-1])


@pytest.fixture(scope="module")
def generations(plugin_site, tiny_model) -> dict:
    stdout = run_python(plugin_site, ["-c", GENERATE, tiny_model("llama-tied-gqa"), tiny_model("gemma2")],
                        KVSERVE_PLATFORM="toy")
    return json.loads(stdout.splitlines()[-1])


def test_discovery_lists_installed_broken_and_in_tree_plugins(discovery):
    records = {r["name"]: r for r in discovery["records"]}
    assert {name: r["package"] for name, r in records.items()} == PACKAGES
    assert {name for name, r in records.items() if r["group"] == "kvserve.plugins"} == {"toy-models"}
    assert records["toy"]["version"] == records["toy-models"]["version"] == "0.1.0"
    assert records["cpu"]["status"] == records["toy"]["status"] == "available"
    assert records["toy-models"]["status"] == "loaded"
    assert records["broken"]["status"] == "failed to load: ImportError: vendor SDK missing"


def test_a_plugin_built_for_another_contract_is_refused_with_the_supported_versions(discovery, plugin_site):
    records = {r["name"]: r for r in discovery["records"]}
    assert records["future"]["status"] == FUTURE_STATUS
    undeclared = plugin_site.parent / "undeclared"   # the toy models without their declaration
    shutil.copytree(plugin_site / "kvserve_toy_platform", undeclared / "kvserve_toy_platform")
    models = undeclared / "kvserve_toy_platform" / "models.py"
    models.write_text(models.read_text().replace("KVSERVE_CONTRACT_VERSION = 1", ""))
    shutil.copytree(next(plugin_site.glob("kvserve_toy_platform-*.dist-info")),
                    undeclared / "kvserve_toy_platform-0.1.0.dist-info")
    stdout = run_python(undeclared, ["-m", "kvserve.core.entrypoints.cli", "plugins"])
    line = next(line for line in stdout.splitlines() if line.startswith("toy-models"))
    assert line.endswith("refused: declares no plugin contract version (KVSERVE_CONTRACT_VERSION); this kvserve "
                         "supports versions 1, 2, 3"), line


def test_broken_plugin_does_not_change_the_default(discovery):
    assert discovery["default"] == "cpu"


def test_unknown_requested_platform_lists_what_was_found(discovery):
    message = discovery["missing"]
    assert "'nope' is not installed" in message
    for expected in ("cpu (available)", "toy (available)", "broken (failed to load: ImportError: vendor SDK missing)"):
        assert expected in message


def test_env_var_selects_toy_and_generation_runs_through_its_hooks(generations):
    run = generations["env"]
    assert (run["platform"], run["backend"]) == ("toy", "toy-naive")
    assert run["kv_cache_memory"] == 32 << 20
    assert run["calls"]["attention"] > 0 and run["calls"]["rms_norm"] > 0
    assert [len(tokens) for tokens in run["tokens"]] == [20] * 4


def test_device_argument_selects_toy(generations):
    assert generations["device"]["platform"] == "toy"
    assert generations["device"]["calls"]["attention"] > 0
    assert generations["device"]["tokens"] == generations["env"]["tokens"]


def test_toy_tokens_equal_cpu_tokens(generations):
    cpu = generations["cpu"]
    from kvserve.kernels_cpu import native

    assert (cpu["platform"], cpu["backend"]) == ("cpu", "cpu-native" if native.load()[0] else "torch-paged")
    assert not any(cpu["calls"].values())
    assert cpu["tokens"] == generations["env"]["tokens"]


def test_int8_on_the_toy_platform_runs_the_reference_and_equals_the_cpu_kernel(generations):
    toy, cpu = generations["toy-int8"], generations["cpu-int8"]
    assert toy["platform"] == "toy" and cpu["platform"] == "cpu"
    assert toy["tokens"] == cpu["tokens"]
    assert toy["tokens"] != generations["env"]["tokens"]   # the weights were quantized


def test_a_vendor_backend_that_keeps_no_fp8_cache_is_a_clear_error(generations):
    assert generations["toy-fp8"] == ("platform 'toy''s attention backend 'toy-naive' cannot keep the KV cache in "
                                      "float8_e4m3fn (FP8 types it keeps: none); use kv_cache_dtype='auto'")



def test_a_vendor_backend_that_does_not_cap_scores_is_a_clear_error(generations):
    assert generations["toy-gemma2"] == ("no attention backend runs every layer of this model (toy-naive: it does not "
                                         "soft-cap attention scores (logits_soft_cap=4.0))")


SPLIT = """
import json, sys
from kvserve import LLM, SamplingParams
params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
for layout in ({}, {"tensor_parallel_size": 2, "data_parallel_size": 2}):
    llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory="8MiB", **layout)
    outputs = llm.generate([[5, 6, 7], [9, 10, 11, 12]], params, use_tqdm=False)
    print(json.dumps([o.outputs[0].token_ids for o in outputs]))
"""


def test_each_replica_and_rank_binds_a_device_of_its_own(plugin_site, tiny_model):
    output = run_python(plugin_site, ["-c", SPLIT, tiny_model("llama-tied-gqa")], with_stderr=True,
                        KVSERVE_PLATFORM="toy")
    one, split = [json.loads(line) for line in output.splitlines() if line.startswith("[")]
    assert split == one
    bound = re.findall(r"runs on cpu \(device (\d+) of this machine's", output)
    # The single engine takes device 0; then replica r's rank k takes 2r + k.
    assert sorted(map(int, bound)) == [0, 0, 1, 2, 3], output[-3000:]


def test_plugins_cli_prints_each_plugin(plugin_site):
    stdout = run_python(plugin_site, ["-m", "kvserve.core.entrypoints.cli", "plugins"])
    lines = stdout.splitlines()
    for name, group, status in (("cpu", "kvserve.platforms", "available"), ("toy", "kvserve.platforms", "available"),
                                ("broken", "kvserve.platforms", "failed to load: ImportError: vendor SDK missing"),
                                ("future", "kvserve.platforms", FUTURE_STATUS),
                                ("toy-models", "kvserve.plugins", "loaded")):
        line = next((line for line in lines if line.split() and line.split()[0] == name), None)
        assert line is not None, stdout
        assert {PACKAGES[name], group} <= set(line.split()) and line.endswith(status), line
    assert "selected platform: cpu" in stdout


class DirectPlatform:
    """A platform object registered without an entry point."""

    def __init__(self, name: str, priority: int = 0, unavailable_reason: str = ""):
        self.info = PlatformInfo(name=name, device_type="cpu", priority=priority, unavailable_reason=unavailable_reason)

    @hookimpl
    def platform_detect(self) -> PlatformInfo:
        return self.info


def manager_with(*platforms: DirectPlatform) -> PluginManager:
    manager = PluginManager(discover=False)
    for platform in platforms:
        manager.register(platform, platform.info.name)
    return manager


def test_unavailable_platform_is_skipped_by_default_and_refused_by_name():
    manager = manager_with(DirectPlatform("npu", priority=50, unavailable_reason="no device"), DirectPlatform("host"))
    assert manager.select_platform().name == "host"
    with pytest.raises(ValueError, match=r"'npu' is unavailable: no device") as error:
        manager.select_platform("npu")
    assert str(error.value).endswith("found: npu (unavailable: no device), host (available)")


def test_tie_at_top_priority_names_both_and_can_be_resolved_by_name():
    manager = manager_with(DirectPlatform("alpha", 5), DirectPlatform("beta", 5), DirectPlatform("low", 1))
    with pytest.raises(ValueError, match=r"platforms alpha, beta tie at priority 5"):
        manager.select_platform()
    assert manager.select_platform("beta").name == "beta"


@pytest.fixture(scope="module")
def cpu():
    return PluginManager().select_platform("cpu")


SPEC = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=16, dtype=torch.float32, block_size=16)


def test_cpu_update_config_fills_kv_cache_memory(cpu):
    config = EngineConfig()
    cpu.update_config(config)
    assert 0 < config.cache.kv_cache_memory <= 4 << 30
    given = EngineConfig(cache=CacheConfig(kv_cache_memory="64MiB"))
    cpu.update_config(given)
    assert given.cache.kv_cache_memory == 64 << 20


def test_cpu_memory_info(cpu):
    info = cpu.memory_info()
    assert isinstance(info, MemoryInfo)
    assert 64 << 20 < info.total_bytes and 0 < info.free_bytes <= info.total_bytes


def test_cpu_attention_backend_supports_a_normal_spec_and_computes_causal_attention(cpu):
    backend_cls = cpu.attention_backend(SPEC)
    assert issubclass(backend_cls, AttentionBackend) and backend_cls.unsupported_reasons(SPEC) == []
    backend = backend_cls(SPEC, cpu.device)
    kv_cache = torch.zeros(backend.kv_cache_shape(4, 16, 2, 16))
    q, k, v = torch.randn(5, 4, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    metadata = backend.build_metadata(StepLayout(query_lens=[5], seq_lens=[5], block_tables=[[3]], num_decodes=0))
    out = backend.forward(q, k, v, kv_cache, metadata, scale=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(0, 1))
    # [keys/values, kv heads, blocks, block_size, head]; a backend may order the keys within a block its own way.
    torch.testing.assert_close(kv_cache[1, :, 3, :5], v.transpose(0, 1))
    padded_keys = torch.cat([k.transpose(0, 1).flatten(1), torch.zeros(2, 11 * 16)], dim=1)
    torch.testing.assert_close(kv_cache[0, :, 3].flatten(1).sort().values, padded_keys.sort().values)
    assert not kv_cache[:, :, :3].any()


def test_cpu_attention_backend_lists_every_reason_it_cannot_run(cpu):
    bad = AttentionSpec(num_heads=5, num_kv_heads=2, head_size=16, dtype=torch.int8, block_size=16)
    backend_cls = cpu.attention_backend(SPEC)
    assert len(backend_cls.unsupported_reasons(bad)) == 2
    with pytest.raises(ValueError, match=r"int8.*5 query heads are not a multiple of 2 kv heads"):
        cpu.attention_backend(bad)


def test_cpu_communicator_single_rank_is_identity(cpu):
    comm = cpu.communicator(0, 1)
    assert isinstance(comm, Communicator) and (comm.rank, comm.world_size) == (0, 1)
    tensor = torch.arange(6.0).view(2, 3)
    for result in (comm.all_reduce(tensor.clone()), comm.all_gather(tensor.clone(), dim=0),
                   comm.broadcast(tensor.clone(), src=0)):
        torch.testing.assert_close(result, tensor)
    assert comm.barrier() is None
    with pytest.raises(ValueError, match="world_size=2 needs an initialized torch.distributed process group"):
        cpu.communicator(0, 2)


def test_cpu_ops_are_known_names(cpu):
    ops = cpu.ops()
    assert isinstance(ops, dict) and set(ops) <= set(REFERENCE_OPS)
    assert Ops(ops).rms_norm is ops.get("rms_norm", REFERENCE_OPS["rms_norm"])


def test_cpu_seed_makes_random_numbers_reproducible(cpu):
    cpu.seed(1234)
    first = torch.rand(8)
    cpu.seed(1234)
    assert torch.equal(torch.rand(8), first)
    cpu.seed(1235)
    assert not torch.equal(torch.rand(8), first)


def test_cpu_synchronize_returns(cpu):
    assert cpu.synchronize() is None
    assert cpu.device == torch.device("cpu") and cpu.info.name == "cpu"
