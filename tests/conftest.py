"""Shared fixtures: tiny random-weight checkpoints built with transformers, and the default model."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors under Triton's interpreter, which must be chosen before triton
# is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from server_utils import openai_client  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, MixtralConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2MoeConfig  # noqa: E402,E501

PLUGIN_SOURCES = Path(__file__).parent / "plugins"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paged attention stores keys and values in blocks.",
    "Continuous batching lets new requests join while others decode; déjà vu, naïve café, 東京, 🙂.",
    "Once upon a time there was a tiny model that generated tokens one at a time, very quickly.",
] * 20

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
ARCHITECTURES = {
    "llama-tied-gqa": (LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-untied-llama3-rope": (LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 128})),
    "qwen2": (Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral-sliding": (MistralConfig, dict(num_key_value_heads=2, sliding_window=24, tie_word_embeddings=False)),
    "mixtral": (MixtralConfig, dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                    tie_word_embeddings=False)),
    # Its second layer is dense; the first routes to 2 of 4 experts beside the shared one.
    "qwen2-moe": (Qwen2MoeConfig, dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                       mlp_only_layers=[1], tie_word_embeddings=False)),
}
# Kernels with a fixed set of head sizes (IPEX) need a realistic one.
EXTRA_ARCHITECTURES = {
    "llama-head64": (LlamaConfig, dict(num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)),
    # Benchmarks draw token ids up to 30000.
    "qwen2-big-vocab": (Qwen2Config, dict(num_key_value_heads=2, vocab_size=30000)),
    # A draft model for speculative decoding: the others' vocabulary, smaller, of other head sizes, shorter.
    "llama-draft": (LlamaConfig, dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                      max_position_embeddings=256)),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def randomize_biases(model: torch.nn.Module) -> None:
    """transformers initialises biases to zero, which a model that ignored them would match: make them count."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=TINY["initializer_range"], generator=generator)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name) -> folder of a random-weight checkpoint saved by transformers."""
    built: dict[str, str] = {}
    tokenizer = build_tokenizer()

    def make(name: str) -> str:
        if name not in built:
            config_cls, extra = {**ARCHITECTURES, **EXTRA_ARCHITECTURES}[name]
            config = config_cls(**{**TINY, **extra})
            config.architectures = [config_cls.__name__.replace("Config", "ForCausalLM")]
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            randomize_biases(model)
            path = str(tmp_path_factory.mktemp(name))
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            built[name] = path
        return built[name]

    return make


@pytest.fixture(scope="session")
def hf_model(tiny_model):
    """hf_model(name) -> the transformers model saved in tiny_model(name), in float32 and eval mode."""
    loaded: dict[str, torch.nn.Module] = {}

    def load(name: str) -> torch.nn.Module:
        if name not in loaded:
            loaded[name] = AutoModelForCausalLM.from_pretrained(tiny_model(name), dtype=torch.float32).eval()
        return loaded[name]

    return load


@pytest.fixture(scope="session")
def qwen2_path(tiny_model) -> str:
    return tiny_model("qwen2")


@pytest.fixture(scope="session")
def qwen2_hf(hf_model):
    return hf_model("qwen2")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    """The tokenizer every tiny checkpoint carries, as transformers loads it."""
    return AutoTokenizer.from_pretrained(tiny_model("qwen2"))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from kvserve.core.loader.model_loader import default_model_path
    path = default_model_path()
    assert os.path.isfile(path)
    return path


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """The toy, broken and future plugin packages (tests/plugins) installed by pip into their own folder, used through
    PYTHONPATH by run_python so that the other tests never see them."""
    tmp = tmp_path_factory.mktemp("plugins")
    sources = []
    for name in ("toy_platform", "broken_platform", "future_platform"):
        sources.append(str(shutil.copytree(PLUGIN_SOURCES / name, tmp / "src" / name,
                                           ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))))
    site = tmp / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                             "--quiet", "--target", str(site), *sources], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def run_python(site: Path, args: list[str], with_stderr: bool = False, **env: str) -> str:
    """Run ``python ARGS`` with the plugin packages of ``site`` importable; returns its stdout (and then its
    stderr, where the engine logs, ``with_stderr``)."""
    environment = {k: v for k, v in os.environ.items() if k != "KVSERVE_PLATFORM"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                            env={**environment, **env})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr * with_stderr


@pytest.fixture(scope="module")
def client(server):
    """The official OpenAI client on the test module's own ``server`` fixture."""
    with openai_client(server, timeout=300) as client:
        yield client
