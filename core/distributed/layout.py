"""How a model splits over tensor-parallel ranks and pipeline stages: a clear error, before any process starts,
where it cannot (or a feature does not run split yet), and the layout start-up logs."""
from __future__ import annotations

from kvserve.core.config import EngineConfig
from kvserve.core.distributed.parallel_state import PipelineStage
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.log import logger


def _kv_heads(hf_config) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def _intermediate_size(hf_config) -> int:
    """The dense MLPs' width, under the name the family's config gives it (GPT-2's n_inner, OPT's ffn_dim, Falcon's
    ffn_hidden_size), 4 x hidden_size where it is unset."""
    for name in ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner"):
        if getattr(hf_config, name, None):
            return getattr(hf_config, name)
    return 4 * hf_config.hidden_size


def log_layout(config: EngineConfig, hf_config, backend: str) -> None:
    size, stages = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
    kv_heads = _kv_heads(hf_config)
    if size > 1:
        logger.info("tensor parallelism over %d ranks a stage (%s): its rank r holds query heads "
                    "[r*%d, (r+1)*%d), %s, columns [r*%d, (r+1)*%d) of the MLPs and rows [r*%d, (r+1)*%d) of the "
                    "vocabulary", size, backend, *[hf_config.num_attention_heads // size] * 2,
                    f"key-value heads [r*{kv_heads // size}, (r+1)*{kv_heads // size})" if kv_heads >= size
                    else f"a copy of key-value head r*{kv_heads}//{size}",
                    *[_intermediate_size(hf_config) // size] * 2, *[-(-hf_config.vocab_size // size)] * 2)
    for index in range(stages if stages > 1 else 0):
        stage, layers = PipelineStage(index, stages), PipelineStage(index, stages).layers(hf_config.num_hidden_layers)
        held = ["the embedding"] * stage.is_first + [f"decoder layers [{layers.start}, {layers.stop})"]
        held += ["the final norm and the output head"] * stage.is_last
        logger.info("pipeline stage %d of %d (ranks %d-%d, %s): %s", index, stages, index * size,
                    (index + 1) * size - 1, backend, ", ".join(held))


def check_parallel(config: EngineConfig, checkpoint: Checkpoint, model_cls: type) -> None:
    parallel, hf_config, path = config.parallel, checkpoint.hf_config, checkpoint.path
    stages, layers = parallel.pipeline_parallel_size, hf_config.num_hidden_layers
    if stages > 1:
        what = f"pipeline_parallel_size={stages}"
        if not getattr(model_cls, "supports_pipeline_parallel", False):
            raise ValueError(f"{what}: {model_cls.__name__} does not split into pipeline stages; use 1")
        if stages > layers:
            raise ValueError(f"{what} exceeds the {layers} decoder layers of {path!r}: every stage needs one; "
                             f"allowed: 1..{layers}")
        if config.speculation is not None:
            raise ValueError(f"{what}: speculative decoding ({config.speculation.method!r}) does not run over "
                             f"pipeline stages yet; use 1, or no speculative_config")
    if parallel.tensor_parallel_size > 1:
        check_tensor_parallel(config, checkpoint)


def check_tensor_parallel(config: EngineConfig, checkpoint: Checkpoint) -> None:
    """A clear error, before any process starts, where the model cannot be split over the ranks or a feature
    does not run split yet."""
    size, hf_config, path = config.parallel.tensor_parallel_size, checkpoint.hf_config, checkpoint.path
    what = f"tensor_parallel_size={size}"
    if checkpoint.own_quantization is not None or config.model.quantization == "gguf":
        raise ValueError(f"{what}: quantized checkpoints ({config.model.quantization}) do not split over ranks "
                         f"yet; use 1, or online quantization (None, 'int8', 'int4', 'fp8' on an unquantized model)")
    if config.speculation is not None and config.speculation.method != "ngram":
        raise ValueError(f"{what}: speculative method {config.speculation.method!r} does not split over ranks yet; "
                         f"use 1, or method 'ngram'")
    heads, kv_heads = hf_config.num_attention_heads, _kv_heads(hf_config)
    experts = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None)
    # What the ranks split evenly: the query heads, the dense MLPs' columns, and the experts or their columns.
    counts = {"query heads": heads}
    expert_size = getattr(hf_config, "moe_intermediate_size", None)
    if experts and expert_size is None:   # Mixtral: every MLP is its experts
        expert_size = hf_config.intermediate_size
    else:
        counts["intermediate size"] = _intermediate_size(hf_config)
    if getattr(hf_config, "shared_expert_intermediate_size", None):
        counts["shared expert intermediate size"] = hf_config.shared_expert_intermediate_size
    if experts:
        counts.update({"experts": experts} if config.parallel.enable_expert_parallel
                      else {"expert intermediate size": expert_size})

    def fits(n: int) -> bool:
        return all(count % n == 0 for count in counts.values()) and (kv_heads % n == 0 or n % kv_heads == 0)

    if not fits(size):
        sizes = ", ".join(str(n) for n in range(1, heads + 1) if fits(n))
        described = ", ".join(f"{count} {name}" for name, count in counts.items())
        raise ValueError(f"{what} cannot split {path!r} ({described}, {kv_heads} key-value heads): the size must "
                         f"divide each of those and divide or be a multiple of the key-value heads; sizes that "
                         f"fit: {sizes}")
