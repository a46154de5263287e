"""The engine: validates requests, schedules them step by step, and turns sampled tokens into outputs."""
from __future__ import annotations

import os
import time
from collections import Counter, deque
from dataclasses import replace

from kvserve.core.config import EngineConfig
from kvserve.core.distributed.executor import DistributedRunner, RankFailure, leave_parallel_group
from kvserve.core.distributed.layout import check_parallel, log_layout
from kvserve.core.distributed.worker import local_device_index
from kvserve.core.engine.beam_search import BeamSearch
from kvserve.core.engine.block_manager import BlockManager
from kvserve.core.engine.detokenizer import IncrementalDetokenizer
from kvserve.core.engine.input_processor import InputProcessor
from kvserve.core.engine.kv_cache import window_blocks_freed
from kvserve.core.engine.logprobs import LogprobsBuilder
from kvserve.core.engine.model_runner import ModelRunner
from kvserve.core.engine.pooling import embedding_output, resolve_runner, schedule_whole_prompts
from kvserve.core.engine.request_state import RequestState
from kvserve.core.engine.scheduler import Scheduler
from kvserve.core.engine.sequence import Sequence
from kvserve.core.engine.speculation import Proposer
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.log import logger
from kvserve.core.lora.request import LoRARequest
from kvserve.core.models.registry import resolve_model_class
from kvserve.core.outputs import EmbeddingRequestOutput, RequestOutput
from kvserve.core.pooling_params import PoolingParams
from kvserve.core.sampling_params import BeamSearchParams, SamplingParams
from kvserve.core.structured_outputs.manager import StructuredOutputManager
from kvserve.plugins.manager import PluginManager

FAULT_TOKEN_ENV = "KVSERVE_FAULT_TOKEN"
FATAL_TOKEN_ENV = "KVSERVE_FATAL_TOKEN"


class LLMEngine:
    def __init__(self, config: EngineConfig, plugins: PluginManager | None = None):
        start = time.perf_counter()
        self.config = config
        if config.parallel.data_parallel_size != 1:
            raise ValueError(f"an LLMEngine is one replica (data_parallel_size=1, got "
                             f"{config.parallel.data_parallel_size}); make_engine(config) builds a front over several")
        checkpoint = Checkpoint.open(config.model)
        config.model.quantization = checkpoint.quantization(config.model.quantization)
        self.plugins = plugins or PluginManager()
        model_cls = resolve_model_class(checkpoint.hf_config, self.plugins.models(), config)
        config.model.runner = resolve_runner(config, model_cls)
        if config.model.runner == "pooling":
            schedule_whole_prompts(config)
        self.platform = self.plugins.select_platform(config.device.device)
        self.platform.bind_device(local_device_index(config, 0))
        self.platform.update_config(config)
        config.finalize(checkpoint.max_model_len)
        self.platform.seed(config.model.seed)
        self.tokenizer = checkpoint.tokenizer(config.model.tokenizer)
        self.eos_token_ids = checkpoint.eos_token_ids or [self.tokenizer.eos_token_id]
        draft = None
        if config.speculation is not None and config.speculation.method == "draft_model":
            draft_checkpoint = Checkpoint.open(config.speculation.source(config.model))
            draft = draft_checkpoint, resolve_model_class(draft_checkpoint.hf_config, self.plugins.models())
        leave_parallel_group()
        parallel = config.parallel
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            check_parallel(config, checkpoint, model_cls)
            self.runner = DistributedRunner(config, self.platform, checkpoint, model_cls)
            log_layout(config, checkpoint.hf_config, self.platform.info.dist_backend)
        else:
            self.runner = ModelRunner(config, self.platform, checkpoint, model_cls, draft)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching, self.runner.num_host_blocks,
                                          window_blocks_freed(self.runner.spec, config))
        self.scheduler = Scheduler(config, self.block_manager)
        self.in_flight: deque = deque()   # steps submitted, oldest first: as many as there are pipeline stages
        self.requests: dict[str, RequestState] = {}
        self.prompt_tokens_total = 0        # prompt tokens computed (prefill), for metrics
        self.generation_tokens_total = 0
        self.speculation = config.speculation
        self.proposer = None if config.speculation is None else Proposer(config.speculation)
        # Speculative decoding: tokens proposed, and accepted, over this many verifications of a proposal
        self.spec_proposed_tokens = self.spec_accepted_tokens = self.spec_verifications = 0
        self.spec_accepted_per_position = Counter()   # i -> verifications that kept the i-th proposed token
        # Test-only fault injection: a step whose new tokens include the first id raises, as a broken device
        # would; a request whose prompt holds the second raises something unexpected, as a bug in the engine would.
        self.fault_token, self.fatal_token = (int(os.environ[name]) if os.environ.get(name) else None
                                              for name in (FAULT_TOKEN_ENV, FATAL_TOKEN_ENV))
        self.max_model_len = config.model.max_model_len
        self.grammars = StructuredOutputManager(config.structured_outputs, self.tokenizer, self.runner.vocab_size,
                                                self.eos_token_ids)
        self.inputs = InputProcessor(self.tokenizer, self.runner.vocab_size, self.max_model_len,
                                     config.scheduler.max_num_seqs, self.grammars, config.model.chat_template,
                                     checkpoint.sampling_defaults(config.model.generation_config),
                                     None if self.runner.pooler is None else self.runner.pooler.config)
        self.logprobs_builder = LogprobsBuilder(self.tokenizer)
        logger.info("loaded %s on %s (%s, %s attention, weights %.1f MiB%s) in %.1fs; KV cache %.2f GiB = %d "
                    "tokens in %d blocks", checkpoint.path, self.platform.name,
                    str(self.runner.dtype).removeprefix("torch."), self.runner.backend.name,
                    self.runner.built.weight_bytes / 2**20,
                    " on rank 0" if parallel.tensor_parallel_size * parallel.pipeline_parallel_size > 1 else "",
                    time.perf_counter() - start, self.runner.kv_cache_bytes / 2**30,
                    self.runner.num_blocks * config.cache.block_size, self.runner.num_blocks)

    def validate(self, prompt: str | list[int], params: SamplingParams | BeamSearchParams) -> list[int]:
        """Check a request without starting it; returns its prompt token ids."""
        return self.inputs.validate(prompt, params)

    def check_lora(self, lora_request: LoRARequest) -> None:
        """Read and check the adapter a request names, without starting the request."""
        if not isinstance(lora_request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        lora = getattr(self.runner, "lora", None)
        if lora is None:
            raise ValueError(f"lora_request {lora_request.lora_name!r} needs an engine started with "
                             f"enable_lora=True (--enable-lora)")
        lora.add(lora_request)

    def remove_lora(self, lora_int_id: int) -> None:
        """Forget an adapter's copies in host and device memory; requests running with it read it again."""
        self.runner.lora.remove(lora_int_id)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | BeamSearchParams,
                    prompt_token_ids: list[int] | None = None, lora_request: LoRARequest | None = None) -> None:
        """Queue a request, sampled or searched by beams, with the LoRA adapter ``lora_request`` names if any;
        ``prompt_token_ids`` skips validation when ``validate`` already gave them."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = prompt_token_ids if prompt_token_ids is not None else self.validate(prompt, params)
        if lora_request is not None:
            self.check_lora(lora_request)
        if self.fatal_token in ids:
            raise RuntimeError(f"injected fatal fault: token {self.fatal_token} ({FATAL_TOKEN_ENV})")
        text = prompt if isinstance(prompt, str) else None
        if isinstance(params, PoolingParams):
            seq = Sequence(request_id, ids, params, self.max_model_len, [], lora_request)
            self.requests[request_id] = RequestState(request_id, params, text, ids, [seq])
            self.scheduler.add(seq)
            return
        if isinstance(params, BeamSearchParams):
            first = Sequence(request_id, ids, SamplingParams(temperature=params.temperature, max_tokens=None),
                             self.max_model_len, self.eos_token_ids, lora_request)
            beam = BeamSearch(params, first, self.eos_token_ids, self.max_model_len)
            self.requests[request_id] = RequestState(request_id, params, text, ids, [first], beam=beam)
            self.scheduler.add(first)
            return
        seqs = [Sequence(request_id, ids, child, self.max_model_len, self.eos_token_ids, lora_request)
                for child in self._child_params(params)]
        constraint = params.structured_outputs
        held = constraint is not None and not self.grammars.hold(request_id, seqs, constraint, ids)
        detokenizers = {s.seq_id: IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                        for s in seqs}
        wants = params.logprobs is not None
        ranked = params.num_samples > params.n
        self.requests[request_id] = RequestState(request_id, params, text, ids, seqs, detokenizers,
                                                 {s.seq_id: [] for s in seqs} if wants else {},
                                                 {s.seq_id: 0.0 for s in seqs} if wants or ranked else {},
                                                 None if params.prompt_logprobs is None else [None])
        bad_words = self.inputs.bad_words_token_ids(params)
        for seq in seqs:
            self.runner.add(seq, bad_words)
        # The first sequence computes the prompt once; the others fork from it when it samples its first token.
        seqs[0].pending_forks = seqs[1:]
        if not held:   # else it joins once its constraint has compiled
            self.scheduler.add(seqs[0])

    @staticmethod
    def _child_params(params: SamplingParams) -> list[SamplingParams]:
        """Each sampled sequence's parameters: a seeded request gives child i the seed + i; only the first
        computes the prompt's logprobs; with best_of > n each child needs its tokens' logprobs for the ranking."""
        if params.num_samples == 1:
            return [params]
        ranked = params.num_samples > params.n
        logprobs = 0 if ranked and params.logprobs is None else params.logprobs
        return [replace(params, n=1, best_of=None, seed=None if params.seed is None else params.seed + i,
                        logprobs=logprobs, prompt_logprobs=params.prompt_logprobs if i == 0 else None)
                for i in range(params.num_samples)]

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self._forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.grammars.held)

    @property
    def failure(self) -> Exception | None:
        """Why no step can run any more, if none can: a rank's process ended."""
        return getattr(self.runner, "failure", None)

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns an output for every request that got a new token.

        If the model step fails, the requests in it are aborted (their blocks freed) and
        EngineStepError names them; the engine itself stays usable.
        """
        if self.grammars.held:
            self._admit_compiled()
        if self.proposer is not None:
            self.proposer.propose(self.scheduler.running)
            self.grammars.trim_proposals(self.scheduler.running)
        depth = self.config.parallel.pipeline_parallel_size
        batch = self.scheduler.schedule(depth - len(self.in_flight))
        if batch.seqs:
            batch.grammar = self.grammars.bitmask(batch)
            self._submit(batch)
        # Pipeline stages run the steps in flight one after another: collect one once they are all busy.
        if not self.in_flight or (batch.seqs and len(self.in_flight) < depth):
            return []
        batch = self.in_flight.popleft()
        return self._finish(batch, self.runner.collect())

    def _admit_compiled(self) -> None:
        """Schedule the requests whose constraints have compiled (waiting a moment when nothing else runs); fail
        those whose constraints could not be compiled."""
        if not self.scheduler.has_unfinished():
            self.grammars.wait_for_held(0.05)
        ready, failed = self.grammars.take_compiled()
        for seq in ready:
            self.scheduler.add(seq)
        for request_id in failed:
            self.abort_request(request_id)
        if failed:
            raise EngineStepError(list(failed), next(iter(failed.values())))

    def _submit(self, batch) -> None:
        try:
            if self.fault_token is not None and any(self.fault_token in s.token_ids[s.num_computed_tokens:]
                                                    for s in batch.seqs):
                raise RuntimeError(f"injected fault: token {self.fault_token} ({FAULT_TOKEN_ENV})")
            self.runner.submit(batch)
        except Exception as exc:
            self.block_manager.forget_step()
            self.scheduler.forget_swaps()
            failed = sorted({s.request_id for s in batch.seqs})
            for request_id in failed:
                self.abort_request(request_id)
            if isinstance(exc, RankFailure):   # no later step can run either
                raise
            raise EngineStepError(failed, exc) from exc
        self.in_flight.append(batch)

    def _finish(self, batch, result) -> list[RequestOutput]:
        """Take a step's tokens; those of sequences aborted while it was in flight are dropped."""
        if result.pooled is not None:
            return self._finish_pooled(batch, result.pooled)
        chunks = zip(batch.seqs[batch.num_decodes:], batch.num_new_tokens[batch.num_decodes:])
        self.prompt_tokens_total += sum(n for s, n in chunks if not s.proposal)
        self.generation_tokens_total += len(result.candidates)
        self.spec_verifications += len(result.accepted)
        self.spec_proposed_tokens += sum(len(s.proposal) for s in result.accepted)
        self.spec_accepted_tokens += sum(result.accepted.values())
        self.spec_accepted_per_position.update(i for n in result.accepted.values() for i in range(n))
        for seq, (first, entries) in result.prompt_logprobs.items():
            if seq.is_finished:
                continue
            known = self.requests[seq.request_id].prompt_logprobs
            known += [None] * (first - len(known))   # the first prompt token: nothing predicts it
            known += map(self.logprobs_builder, entries)
        touched: dict[str, RequestState] = {}
        for seq, (token_ids, logprobs) in result.candidates.items():
            if seq.is_finished:
                continue
            touched[seq.request_id] = self.requests[seq.request_id]
            seq.beam.report(seq, token_ids, logprobs)
        for seq, token in result.sampled:
            if seq.is_finished:   # a stop among a speculating sequence's accepted tokens ends it there
                continue
            request = self.requests[seq.request_id]
            seq.token_ids.append(token)
            self.generation_tokens_total += 1
            if result.logprobs.get(seq):
                entry = result.logprobs[seq].pop(0)   # a speculating sequence's, one per kept token
                if request.params.logprobs is not None:
                    request.logprobs[seq.seq_id].append(self.logprobs_builder(entry))
                request.cumulative_logprobs[seq.seq_id] += entry.logprob
            self._check_stop(seq, request.detokenizers[seq.seq_id], self.grammars.accept(seq.seq_id, token))
            touched[seq.request_id] = request
        self.scheduler.finish_step(batch, result.accepted)
        for request in touched.values():
            if request.beam is not None and request.beam.ready:
                request.beam.advance(self.scheduler)
        outputs = [r.output(self.tokenizer) for r in touched.values() if r.streams or r.finished]
        for output in outputs:
            if output.finished:
                self._forget(output.request_id)
        return outputs

    def _finish_pooled(self, batch, pooled: list[list[float]]) -> list[EmbeddingRequestOutput]:
        """Each pooled prompt's embedding: its request is done."""
        self.prompt_tokens_total += sum(batch.num_new_tokens)
        outputs = [embedding_output(seq, embedding) for seq, embedding in zip(batch.seqs, pooled)
                   if not seq.is_finished]   # else aborted while in flight
        for seq in batch.seqs:
            if not seq.is_finished:
                seq.finish("stop")
        self.scheduler.finish_step(batch, {})
        for output in outputs:
            self._forget(output.request_id)
        return outputs

    def _check_stop(self, seq: Sequence, detok: IncrementalDetokenizer, grammar_complete: bool) -> None:
        """Finish ``seq`` if its newest token ends it: a stop token or string, its grammar's end, its length."""
        params, token = seq.params, seq.token_ids[-1]
        stops = seq.num_output_tokens >= params.min_tokens and token in seq.stop_token_ids
        # A stop token ends the output without its text, as in vLLM, unless include_stop_str_in_output.
        delta = "" if stops and not params.include_stop_str_in_output else detok.add(token)
        if grammar_complete and token not in seq.stop_token_ids:
            seq.finish("stop")
        if seq.num_output_tokens >= params.min_tokens and not seq.is_finished:
            if token in seq.eos_token_ids:
                seq.finish("stop")
            elif token in (params.stop_token_ids or ()):
                seq.finish("stop", token)
            for stop in params.stop_strings if not seq.is_finished else ():
                at = detok.text.find(stop, max(0, len(detok.text) - len(delta) - len(stop) + 1))
                if at >= 0:
                    detok.text = detok.text[:at + len(stop) if params.include_stop_str_in_output else at]
                    return seq.finish("stop", stop)   # the text held back is cut off with the stop string
        if not seq.is_finished and seq.num_tokens >= seq.max_total_tokens:
            seq.finish("length")
        if seq.is_finished:
            detok.flush()

    def _forget(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        for seq in request.seqs if request else []:
            self.runner.release(seq)
            self.grammars.release(request_id, seq.seq_id)
            if self.proposer is not None:
                self.proposer.release(seq)


class EngineStepError(RuntimeError):
    """A model step failed; the requests it ran were aborted and the engine goes on."""

    def __init__(self, request_ids: list[str], cause: Exception):
        super().__init__(f"model step failed for requests {request_ids}: {type(cause).__name__}: {cause}")
        self.request_ids = request_ids
        self.cause = cause
