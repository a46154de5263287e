"""The engine: validates requests, schedules them step by step, and turns sampled tokens into outputs."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kvserve.core.config import EngineConfig
from kvserve.core.engine.block_manager import BlockManager
from kvserve.core.engine.detokenizer import IncrementalDetokenizer
from kvserve.core.engine.model_runner import ModelRunner
from kvserve.core.engine.scheduler import Scheduler
from kvserve.core.engine.sequence import Sequence
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.models.registry import resolve_model_class
from kvserve.core.outputs import CompletionOutput, RequestOutput
from kvserve.core.sampling_params import SamplingParams
from kvserve.plugins.manager import PluginManager

logger = logging.getLogger("kvserve")


@dataclass
class _Request:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig, plugins: PluginManager | None = None):
        start = time.perf_counter()
        self.config = config
        checkpoint = Checkpoint.open(config.model.model)
        self.plugins = plugins or PluginManager()
        model_cls = resolve_model_class(checkpoint.hf_config, self.plugins.models())
        self.platform = self.plugins.select_platform(config.device.device)
        self.platform.update_config(config)
        config.finalize(checkpoint.max_model_len)
        self.platform.seed(config.model.seed)
        self.tokenizer = checkpoint.tokenizer(config.model.tokenizer)
        self.eos_token_ids = checkpoint.eos_token_ids or [self.tokenizer.eos_token_id]
        self.runner = ModelRunner(config, self.platform, checkpoint, model_cls)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size)
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[str, _Request] = {}
        self.max_model_len = config.model.max_model_len
        logger.info("loaded %s on %s (%s, %s attention) in %.1fs; KV cache %.2f GiB = %d tokens in %d blocks",
                    checkpoint.path, self.platform.name, str(self.runner.dtype).removeprefix("torch."),
                    self.runner.backend.name, time.perf_counter() - start, self.runner.kv_cache_bytes / 2**30,
                    self.runner.num_blocks * config.cache.block_size, self.runner.num_blocks)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt, checked against the vocabulary and the context length."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; give at least one character or token id")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.runner.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {self.runner.vocab_size})")
        else:
            raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty; give at least one character or token id")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                             f"the prompt may have at most {self.max_model_len - 1} tokens")
        return ids

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Check a request without starting it; returns its prompt token ids."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        bad = [t for t in params.stop_token_ids or [] if t >= self.runner.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {self.runner.vocab_size})")
        return self.tokenize(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    prompt_token_ids: list[int] | None = None) -> None:
        """Queue a request; ``prompt_token_ids`` skips validation when ``validate`` already gave them."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = prompt_token_ids if prompt_token_ids is not None else self.validate(prompt, params)
        seq = Sequence(request_id, ids, params, self.max_model_len, self.eos_token_ids)
        detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        self.requests[request_id] = _Request(seq, prompt if isinstance(prompt, str) else None, detokenizer)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._forget(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns an output for every request that got a new token."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        sampled = self.runner.execute(batch)
        outputs = []
        for seq, token in sampled:
            seq.token_ids.append(token)
            self._check_stop(seq, self.requests[seq.request_id].detokenizer.add(token))
            outputs.append(self._output(seq))
        self.scheduler.finish_step(batch)
        for seq, _ in sampled:
            if seq.is_finished:
                self._forget(seq)
        return outputs

    def _check_stop(self, seq: Sequence, delta: str) -> None:
        params, token = seq.params, seq.token_ids[-1]
        if seq.num_output_tokens >= params.min_tokens:
            if token in seq.eos_token_ids:
                return seq.finish("stop")
            if token in (params.stop_token_ids or ()):
                return seq.finish("stop", token)
            detok = self.requests[seq.request_id].detokenizer
            for stop in params.stop_strings:
                at = detok.text.find(stop, max(0, len(detok.text) - len(delta) - len(stop) + 1))
                if at >= 0:
                    detok.text = detok.text[:at + len(stop) if params.include_stop_str_in_output else at]
                    return seq.finish("stop", stop)
        if seq.num_tokens >= seq.max_total_tokens:
            seq.finish("length")

    def _output(self, seq: Sequence) -> RequestOutput:
        request = self.requests[seq.request_id]
        completion = CompletionOutput(0, request.detokenizer.text, seq.output_token_ids, seq.finish_reason,
                                      seq.stop_reason)
        return RequestOutput(seq.request_id, request.prompt, seq.token_ids[:seq.num_prompt_tokens], [completion],
                             seq.is_finished)

    def _forget(self, seq: Sequence) -> None:
        self.runner.release(seq)
        self.requests.pop(seq.request_id, None)
