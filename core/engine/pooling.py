"""Pooling models in the engine: which runner a model gets, the scheduling a pooled prompt needs, and its output."""
from __future__ import annotations

from kvserve.core.config import EngineConfig
from kvserve.core.engine.sequence import Sequence
from kvserve.core.log import logger
from kvserve.core.outputs import EmbeddingOutput, EmbeddingRequestOutput


def resolve_runner(config: EngineConfig, model_cls: type) -> str:
    """'pooling' or 'generate' for ``config``'s runner option: auto pools with an encoder (a model class with
    ``is_pooling_model``) and generates with any other; a generative model asked to pool gives its last token's
    hidden state, as vLLM's converted embedding models do."""
    encoder = getattr(model_cls, "is_pooling_model", False)
    if config.model.runner == "generate" and encoder:
        raise ValueError(f"runner='generate': {model_cls.__name__} is an encoder with no language-model head to "
                         f"generate with; use runner='pooling' (or 'auto') and LLM.embed or /v1/embeddings")
    return "pooling" if encoder or config.model.runner == "pooling" else "generate"


def schedule_whole_prompts(config: EngineConfig) -> None:
    """Pooling reads every prompt token's hidden state, so each prompt is computed whole in one step, from its
    first token: no chunked prefill, no prefix cache. Options that only generation uses are refused."""
    parallel = config.parallel
    if config.speculation is not None:
        raise ValueError(f"speculative_config ({config.speculation.method!r}) speeds up generation; a pooling model "
                         f"(runner='pooling') generates nothing: remove it")
    if parallel.pipeline_parallel_size > 1:
        raise ValueError(f"pipeline_parallel_size={parallel.pipeline_parallel_size}: pooling models do not run over "
                         f"pipeline stages yet; use 1 (tensor_parallel_size splits them)")
    scheduler, cache = config.scheduler, config.cache
    if scheduler.enable_chunked_prefill or cache.enable_prefix_caching:
        logger.info("pooling model: every prompt is computed whole in one step (no chunked prefill, no prefix cache)")
    scheduler.enable_chunked_prefill = cache.enable_prefix_caching = False


def embedding_output(seq: Sequence, embedding: list[float]) -> EmbeddingRequestOutput:
    return EmbeddingRequestOutput(seq.request_id, EmbeddingOutput(embedding), seq.token_ids[:seq.num_prompt_tokens])
