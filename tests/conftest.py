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
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig  # noqa: E402,E501
from transformers import GPT2Config, OPTConfig  # noqa: E402
from transformers import Gemma2Config, GemmaConfig, Phi3Config  # noqa: E402
from transformers import FalconConfig, GPTNeoXConfig  # noqa: E402

from kvserve.conformance.tiny_model import build_tokenizer, randomize_norms_and_biases, save_tiny_model  # noqa: E402,E501

PLUGIN_SOURCES = Path(__file__).parent / "plugins"
ARCHITECTURES = {
    "llama-tied-gqa": (LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-untied-llama3-rope": (LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 128})),
    "qwen2": (Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # use_sliding_window: layers from max_window_layers on slide (window 24), the first attends globally.
    "qwen2-sliding": (Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=False, use_sliding_window=True,
                                        sliding_window=24, max_window_layers=1)),
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
    # Heads of 32, not hidden_size / heads = 16.
    "qwen3": (Qwen3Config, dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
    # Biases on q, k, v and o (attention_bias, as Llama's).
    "qwen3-bias": (Qwen3Config, dict(num_key_value_heads=2, head_dim=32, attention_bias=True,
                                     tie_word_embeddings=False)),
    # Its second layer is dense; the first routes to 2 of 4 experts, their weights renormalized.
    "qwen3-moe": (Qwen3MoeConfig, dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1],
                                       tie_word_embeddings=False)),
    # GPT-2 and OPT with MLPs as wide as the others' (n_inner, ffn_dim) and a key-value head per head.
    "gpt2": (GPT2Config, dict(n_inner=128, num_key_value_heads=4)),
    # Attention scores scaled by 1 / (layer index + 1) alone (not by 1 / sqrt(head size)), exact GELU, an untied
    # head.
    "gpt2-scaled": (GPT2Config, dict(n_inner=128, num_key_value_heads=4, scale_attn_by_inverse_layer_idx=True,
                                     scale_attn_weights=False, activation_function="gelu",
                                     tie_word_embeddings=False)),
    "opt": (OPTConfig, dict(ffn_dim=128, num_key_value_heads=4)),
    # OPT-350m's: LayerNorm after each residual sum, embeddings of 32 projected in and out.
    "opt-350m": (OPTConfig, dict(ffn_dim=128, num_key_value_heads=4, do_layer_norm_before=False,
                                 word_embed_proj_dim=32)),
    # No biases, LayerNorms without weights, no final norm, projected embeddings, an untied head.
    "opt-plain": (OPTConfig, dict(ffn_dim=128, num_key_value_heads=4, enable_bias=False, word_embed_proj_dim=32,
                                  layer_norm_elementwise_affine=False, _remove_final_layer_norm=True,
                                  activation_function="gelu_new", tie_word_embeddings=False)),
    # Phi-4-mini's rotary over 3/4 of each head, longrope-scaled past an original context of 64 positions.
    "phi3-longrope": (Phi3Config, dict(num_key_value_heads=2, partial_rotary_factor=0.75, pad_token_id=0,
                                       original_max_position_embeddings=64, rope_scaling={
                                           "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                           "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]})),
    "phi3-sliding": (Phi3Config, dict(num_key_value_heads=2, sliding_window=24, pad_token_id=0,
                                      tie_word_embeddings=False)),
    # Heads of 32, not hidden_size / heads = 16, and one key-value head (Gemma 2B's multi-query attention).
    "gemma": (GemmaConfig, dict(num_key_value_heads=1, head_dim=32)),
    # A sliding layer (window 24) then a global one; queries scaled by 1/sqrt(24), not 1/sqrt(32); caps low enough
    # that scores and logits of this model's size reach them. Untied: a tied head echoes the last token, whatever
    # attention does.
    "gemma2": (Gemma2Config, dict(num_key_value_heads=2, head_dim=32, sliding_window=24, query_pre_attn_scalar=24,
                                  attn_logit_softcapping=4.0, final_logit_softcapping=2.0,
                                  tie_word_embeddings=False)),
    # Rotary over the first quarter (half) of each head; attention and MLP side by side (one after the other).
    "gpt-neox": (GPTNeoXConfig, dict(num_key_value_heads=4, rotary_pct=0.25, use_parallel_residual=True,
                                     tie_word_embeddings=False)),
    "gpt-neox-sequential": (GPTNeoXConfig, dict(num_key_value_heads=4, rotary_pct=0.5, use_parallel_residual=False,
                                                attention_bias=False, tie_word_embeddings=True)),
    # Falcon-40B's grouped key-value heads with a norm each for attention and MLP; Falcon-7B's multi-query
    # attention beside the MLP on one norm; the older layers, one after the other, with a key-value head a query's.
    "falcon-gqa": (FalconConfig, dict(new_decoder_architecture=True, num_kv_heads=2, num_key_value_heads=2,
                                      ffn_hidden_size=128, bias=True, tie_word_embeddings=False)),
    "falcon-multi-query": (FalconConfig, dict(multi_query=True, num_key_value_heads=1, parallel_attn=True,
                                              ffn_hidden_size=128)),
    "falcon-sequential": (FalconConfig, dict(multi_query=False, num_key_value_heads=4, parallel_attn=False,
                                             ffn_hidden_size=128, bias=True)),
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name) -> folder of a random-weight checkpoint saved by transformers."""
    built: dict[str, str] = {}
    tokenizer = build_tokenizer()

    def make(name: str) -> str:
        if name not in built:
            config_cls, extra = {**ARCHITECTURES, **EXTRA_ARCHITECTURES}[name]
            path = save_tiny_model(str(tmp_path_factory.mktemp(name)), config_cls, tokenizer, **extra)
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
def randomized_checkpoint(tiny_model, tmp_path_factory):
    """randomized_checkpoint(name) -> (folder, transformers model) of tiny_model(name) with its norms' weights and
    its biases random (Gemma's norms around 0, since it scales by 1 + weight)."""
    made: dict[str, tuple[str, torch.nn.Module]] = {}

    def make(name: str) -> tuple[str, torch.nn.Module]:
        if name not in made:
            hf = AutoModelForCausalLM.from_pretrained(tiny_model(name), dtype=torch.float32).eval()
            randomize_norms_and_biases(hf, -0.5 if hf.config.model_type.startswith("gemma") else 0.5)
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path)
            AutoTokenizer.from_pretrained(tiny_model(name)).save_pretrained(path)
            made[name] = str(path), hf
        return made[name]

    return make


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


def install_plugins(folder: Path, sources: list[Path]) -> Path:
    """pip-install the plugin packages at ``sources`` into ``folder``/site, used through PYTHONPATH by run_python so
    that the other tests never see them."""
    copies = [str(shutil.copytree(source, folder / "src" / source.name,
                                  ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")))
              for source in sources]
    site = folder / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                             "--quiet", "--target", str(site), *copies], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return site


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """The toy, broken and future plugin packages of tests/plugins, installed."""
    return install_plugins(tmp_path_factory.mktemp("plugins"),
                           [PLUGIN_SOURCES / name for name in ("toy_platform", "broken_platform", "future_platform")])


def run_python(site: Path, args: list[str], with_stderr: bool = False, returncode: int = 0, **env: str) -> str:
    """Run ``python ARGS`` with the plugin packages of ``site`` importable, expecting its exit status
    ``returncode``; returns its stdout (and then its stderr, where the engine logs, ``with_stderr``)."""
    environment = {k: v for k, v in os.environ.items() if k != "KVSERVE_PLATFORM"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                            env={**environment, **env})
    assert result.returncode == returncode, result.stdout + result.stderr
    return result.stdout + result.stderr * with_stderr


@pytest.fixture(scope="module")
def client(server):
    """The official OpenAI client on the test module's own ``server`` fixture."""
    with openai_client(server, timeout=300) as client:
        yield client
