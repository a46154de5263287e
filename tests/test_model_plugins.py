"""General plugins (entry-point group kvserve.plugins) for real: the toy package's model plugin, installed with
pip, adds an architecture that generates; two plugins registering one name is a clear error."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_python

from kvserve import LLM

MODEL_PLUGIN = """
import json, sys
from kvserve import LLM, SamplingParams
from kvserve.core.config import build_engine_config
from kvserve.core.engine.llm_engine import LLMEngine
from kvserve.plugins import hookimpl
from kvserve.plugins.manager import GENERAL_GROUP, PluginManager
params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
prompts = ["The quick brown fox", "Once upon a time"]
result = {}
for name, path in (("toy", sys.argv[1]), ("llama", sys.argv[2])):
    llm = LLM(path, dtype="float32", kv_cache_memory="8MiB")
    result[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    if name == "toy":
        model = type(llm.llm_engine.runner.model)
        result["model_class"] = f"{model.__module__}.{model.__name__}"

class Rival:
    def __init__(self, name):
        self.name = name

    @hookimpl
    def register_models(self):
        return {self.name: object}

for key, name in (("clash", "ToyLlamaForCausalLM"), ("builtin", "LlamaForCausalLM")):
    manager = PluginManager()
    manager.register(Rival(name), "rival", GENERAL_GROUP)
    try:
        LLMEngine(build_engine_config(sys.argv[1], dtype="float32", kv_cache_memory="8MiB"), plugins=manager)
    except ValueError as exc:
        result[key] = str(exc)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def toy_llama_checkpoint(tiny_model, tmp_path_factory) -> str:
    """The tiny Llama with config.json naming the architecture that only the toy model plugin registers."""
    path = shutil.copytree(tiny_model("llama-tied-gqa"), tmp_path_factory.mktemp("toy-llama") / "model")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["ToyLlamaForCausalLM"]}))
    return str(path)


def test_model_plugin_architecture_generates_like_llama(plugin_site, tiny_model, toy_llama_checkpoint):
    stdout = run_python(plugin_site, ["-c", MODEL_PLUGIN, toy_llama_checkpoint, tiny_model("llama-tied-gqa")])
    result = json.loads(stdout.splitlines()[-1])
    assert result["model_class"] == "kvserve_toy_platform.models.ToyLlamaForCausalLM"
    assert result["toy"] == result["llama"] and len(result["toy"][0]) == 16
    assert result["clash"] == "model architecture 'ToyLlamaForCausalLM' is registered by two plugins"
    assert result["builtin"] == "plugins re-register built-in model architectures ['LlamaForCausalLM']"


def test_plugin_architecture_is_unknown_without_the_plugin(toy_llama_checkpoint):
    with pytest.raises(ValueError, match=r"\['ToyLlamaForCausalLM'\] is not supported; supported: .*LlamaForCausalLM"):
        LLM(toy_llama_checkpoint, dtype="float32", kv_cache_memory="8MiB")
