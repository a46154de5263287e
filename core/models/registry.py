"""Model classes by the Hugging Face ``architectures`` name they implement."""
from __future__ import annotations

from torch import nn

from kvserve.core.log import logger
from kvserve.core.models.bert import BertModel
from kvserve.core.models.falcon import FalconForCausalLM
from kvserve.core.models.gemma import GemmaForCausalLM
from kvserve.core.models.gemma2 import Gemma2ForCausalLM
from kvserve.core.models.gpt2 import GPT2LMHeadModel
from kvserve.core.models.gpt_neox import GPTNeoXForCausalLM
from kvserve.core.models.llama import LlamaForCausalLM, MistralForCausalLM
from kvserve.core.models.mixtral import MixtralForCausalLM
from kvserve.core.models.opt import OPTForCausalLM
from kvserve.core.models.phi3 import Phi3ForCausalLM
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
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "BertModel": BertModel,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "OPTForCausalLM": OPTForCausalLM,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
    "FalconForCausalLM": FalconForCausalLM,
}


def resolve_model_class(hf_config, plugin_models: dict[str, type[nn.Module]], config=None) -> type[nn.Module]:
    """The class for the first of the config's architectures that kvserve or a plugin implements, else (with
    model_impl auto or transformers) transformers' own modeling code for a causal LM it knows. ``config``: the
    EngineConfig, whose model_impl chooses and whose options the transformers implementation checks; None: auto."""
    clash = set(BUILTIN_MODELS) & set(plugin_models)
    if clash:
        raise ValueError(f"plugins re-register built-in model architectures {sorted(clash)}")
    models = {**BUILTIN_MODELS, **plugin_models}
    model_impl = "auto" if config is None else config.model.model_impl
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures if model_impl != "transformers" else ():
        if arch in models:
            logger.info("running the native implementation of %s", arch)
            return models[arch]
    # Here: importing transformers' modeling machinery takes seconds, which starting a native model need not.
    from kvserve.core.models.transformers_fallback import (TransformersForCausalLM, check_engine_config,
                                                           transformers_architecture)

    fallback = transformers_architecture(hf_config) if model_impl in ("auto", "transformers") else None
    if fallback is not None:
        if config is not None:
            check_engine_config(config, hf_config)
        logger.info("running the transformers implementation of %s", fallback)
        return TransformersForCausalLM
    if model_impl == "transformers":
        raise ValueError(f"model_impl='transformers': model architecture {architectures or '(none given)'} is not "
                         f"a causal LM that transformers implements for model_type "
                         f"{getattr(hf_config, 'model_type', None)!r}")
    raise ValueError(f"model architecture {architectures or '(none given)'} is not supported; "
                     f"supported: {', '.join(sorted(models))}, and (model_impl 'auto' or 'transformers') the causal "
                     f"LMs that transformers implements")
