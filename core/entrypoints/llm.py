"""The offline API, with vLLM's names: ``LLM(...).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import logging
from itertools import count
from typing import Sequence as Seq

from tqdm import tqdm

from kvserve.core.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from kvserve.core.engine.llm_engine import LLMEngine
from kvserve.core.outputs import RequestOutput
from kvserve.core.sampling_params import SamplingParams

Prompt = str | list[int] | dict


def _init_logging() -> None:
    logger = logging.getLogger("kvserve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class LLM:
    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 128, max_num_batched_tokens: int | None = None,
                 seed: int = 0, enable_prefix_caching: bool = False, enable_chunked_prefill: bool = True,
                 num_gpu_blocks_override: int | None = None, quantization: str | None = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
                 speculative_config: dict | None = None, block_size: int = 16,
                 kv_cache_memory: int | str | None = None, device: str | None = None, enforce_eager: bool = False,
                 chat_template: str | None = None):
        _init_logging()
        config = EngineConfig(
            model=ModelConfig(model, tokenizer, dtype, max_model_len, seed, quantization, chat_template),
            cache=CacheConfig(block_size, kv_cache_memory, num_gpu_blocks_override, enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill),
            parallel=ParallelConfig(tensor_parallel_size, pipeline_parallel_size, data_parallel_size),
            device=DeviceConfig(device, enforce_eager),
            speculative_config=speculative_config,
        )
        self.llm_engine = LLMEngine(config)
        self._request_ids = count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or {"prompt_token_ids": [...]}), in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [p["prompt_token_ids"] if isinstance(p, dict) else p for p in prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts; give one or one each")
        engine = self.llm_engine
        token_ids = [engine.validate(p, sp) for p, sp in zip(prompts, params)]  # all checked before any starts
        ids = [str(next(self._request_ids)) for _ in prompts]
        for request_id, prompt, param, prompt_ids in zip(ids, prompts, params, token_ids):
            engine.add_request(request_id, prompt, param, prompt_ids)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate a reply."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, chat_template, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, conversation: list[dict], chat_template: str | None = None,
                            add_generation_prompt: bool = True) -> list[int]:
        return self.llm_engine.inputs.render_chat(conversation, chat_template, add_generation_prompt)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        pending = set(request_ids)
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while pending:
                for output in engine.step():
                    if output.finished and output.request_id in pending:
                        done[output.request_id] = output
                        pending.discard(output.request_id)
                        bar.update(1)
        return [done[i] for i in request_ids]
