"""Model classes by the Hugging Face ``architectures`` name they implement."""
from __future__ import annotations

from torch import nn

from kvserve.core.models.llama import LlamaForCausalLM, MistralForCausalLM
from kvserve.core.models.mixtral import MixtralForCausalLM
from kvserve.core.models.qwen2 import Qwen2ForCausalLM
from kvserve.core.models.qwen2_moe import Qwen2MoeForCausalLM
from kvserve.core.models.qwen3 import Qwen3ForCausalLM
from kvserve.core.models.qwen3_moe import Qwen3MoeForCausalLM

BUILTIN_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def resolve_model_class(hf_config, plugin_models: dict[str, type[nn.Module]]) -> type[nn.Module]:
    """The class for the first of the config's architectures that kvserve or a plugin implements."""
    clash = set(BUILTIN_MODELS) & set(plugin_models)
    if clash:
        raise ValueError(f"plugins re-register built-in model architectures {sorted(clash)}")
    models = {**BUILTIN_MODELS, **plugin_models}
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in models:
            return models[arch]
    raise ValueError(f"model architecture {architectures or '(none given)'} is not supported; "
                     f"supported: {', '.join(sorted(models))}")
