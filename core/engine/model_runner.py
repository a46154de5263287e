"""Builds the model and its paged KV cache on the platform's device, and runs one scheduled step."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from kvserve.core.config import EngineConfig
from kvserve.core.distributed.parallel_state import pipeline_stage
from kvserve.core.engine.beam_search import beam_candidates
from kvserve.core.engine.draft_model import DraftModel
from kvserve.core.engine.eagle import EagleDrafter
from kvserve.core.engine.kv_cache import allocate_kv_cache, bind_kv_scales, blocks_without_cache
from kvserve.core.engine.logprobs import PromptLogprobsPlanner, TokenLogprobs, kept_token_logprobs, prompt_logprobs
from kvserve.core.engine.medusa import MedusaHeads
from kvserve.core.engine.model_builder import build_model, choose_dtype
from kvserve.core.engine.scheduler import ScheduledBatch
from kvserve.core.engine.sequence import Sequence
from kvserve.core.engine.speculation import verify
from kvserve.core.engine.sampler import Sampler
from kvserve.core.layers.ops import Ops
from kvserve.core.layers.pooler import Pooler, PoolerConfig
from kvserve.core.loader.model_loader import Checkpoint, local_path
from kvserve.core.lora.manager import LoRAManager
from kvserve.core.structured_outputs.manager import GrammarBitmask
from kvserve.plugins.interfaces import StepLayout
from kvserve.plugins.manager import Platform


@dataclass
class StepOutput:
    sampled: list[tuple[Sequence, int]] = field(default_factory=list)   # (sequence, its new token)
    logprobs: dict[Sequence, list[TokenLogprobs]] = field(default_factory=dict)   # its new tokens', if asked for
    # (index of the first prompt token covered, one entry per prompt token from there on), if asked for
    prompt_logprobs: dict[Sequence, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # beam -> its most likely next tokens and their logprobs, best first (beams report instead of sampling)
    candidates: dict[Sequence, tuple[list[int], list[float]]] = field(default_factory=dict)
    accepted: dict[Sequence, int] = field(default_factory=dict)   # speculating sequence -> proposed tokens kept
    pooled: list[list[float]] | None = None   # a pooling model's: each sequence's embedding, in the batch's order


def step_layout(batch: ScheduledBatch) -> StepLayout:
    """The backend's view of ``batch``. A speculating sequence's tokens go in as decodes, one per position (each
    seeing the positions before it), so that verifying them runs the decode kernels and computes exactly what
    decoding one token a step would have."""
    query_lens, seq_lens, block_tables = [], [], []
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        as_decodes = n if seq.proposal else 1
        query_lens += [n // as_decodes] * as_decodes
        seq_lens += range(seq.num_computed_tokens + n - as_decodes + 1, seq.num_computed_tokens + n + 1)
        block_tables += [seq.block_table] * as_decodes
    num_decodes = batch.num_decodes + sum(n for seq, n in zip(batch.seqs, batch.num_new_tokens) if seq.proposal)
    return StepLayout(query_lens, seq_lens, block_tables, num_decodes)


class ModelRunner:
    def __init__(self, config: EngineConfig, platform: Platform, checkpoint: Checkpoint, model_cls: type,
                 draft: tuple[Checkpoint, type] | None = None):
        """``draft``: a draft model's checkpoint and model class, for speculative decoding's draft_model."""
        self.config = config
        self.device = platform.device
        self.dtype = choose_dtype(config, checkpoint, platform)
        self.vocab_size = checkpoint.hf_config.vocab_size
        self.ops = Ops(platform.ops())
        self.pooler = None if config.model.runner != "pooling" else Pooler(PoolerConfig.of(
            checkpoint.path, checkpoint.hf_config, getattr(model_cls, "default_pooling_type", "LAST")))
        built = build_model(config, platform, checkpoint, model_cls, self.ops, self.dtype,
                            config.model.quantization, config.model.quantization_group_size)
        self.built, self.model, self.spec, self.backend = built, built.model, built.spec, built.backend
        layers = built.layers
        speculation = config.speculation
        self.drafter = None if draft is None else DraftModel(config, platform, *draft, self.ops, self.dtype,
                                                             self.vocab_size)
        if speculation is not None and speculation.method == "eagle":
            self.drafter = EagleDrafter(config, platform, self.model, checkpoint.hf_config, self.ops, self.dtype)
        self.medusa = None if speculation is None or speculation.method != "medusa" else MedusaHeads(
            local_path(speculation.source(config.model)), checkpoint.hf_config.hidden_size, self.vocab_size,
            speculation.num_speculative_tokens, self.ops, self.device, self.dtype)
        if getattr(model_cls, "is_pooling_model", False):
            cache = blocks_without_cache(config, len(layers), platform)
        else:
            cache = allocate_kv_cache(config, self.spec, self.backend, len(layers), platform,
                                      0 if self.drafter is None else self.drafter.block_bytes)
        if self.drafter is not None:
            self.drafter.allocate(cache)
        self.num_blocks, self.num_host_blocks, self.kv_cache_bytes = (cache.num_blocks, cache.num_host_blocks,
                                                                      cache.num_bytes)
        self.kv_cache, self.host_kv_cache = cache.device_cache, cache.host_cache
        self.populating_kv_cache = cache.populating
        built.bind(self.kv_cache)
        bind_kv_scales(layers, self.spec, config.cache.calculate_kv_scales)
        self.lora = None if not config.lora.enable_lora else LoRAManager(config.lora, self.model,
                                                                         platform.linear_kernel, self.device,
                                                                         self.dtype)
        # A pooling step holds whole prompts, which a recording of one-token prompts could not replay; a recording
        # would replay the adapter slots of the step it recorded.
        self.graph_runner = built.graph_runner = (None if self.pooler is not None or self.lora is not None
                                                  else platform.graph_runner(self.model, self.backend, config))
        self.sampler = Sampler(self.device, self.ops.argmax)
        self.prompt_logprobs = PromptLogprobsPlanner()
        self.submitted: deque[StepOutput] = deque()

    def wait_for_kv_cache(self) -> None:
        """Return once the KV cache's memory is resident. Benchmarks time the steady state, as they would on an
        engine that zeroed its cache at start-up; on this VM the background faulting of a 4 GiB CPU cache takes
        up to 10 s and competes with the first steps for memory bandwidth."""
        if self.populating_kv_cache is not None:
            self.populating_kv_cache.join()

    def add(self, seq: Sequence, bad_words_token_ids: list[list[int]]) -> None:
        self.sampler.add(seq, bad_words_token_ids)
        self.prompt_logprobs.add(seq)

    def release(self, seq: Sequence) -> None:
        self.sampler.release(seq)
        self.prompt_logprobs.release(seq)

    def submit(self, batch: ScheduledBatch) -> None:
        """Run a step, whose output ``collect`` returns (a split model's runner returns before its last stage
        has run the step)."""
        self.submitted.append(self.execute(batch))

    def collect(self) -> StepOutput:
        return self.submitted.popleft()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, intermediate: tuple = ()) -> StepOutput | tuple:
        """Run one step: a new token for every sequence whose step reached its last token, with the logprobs
        its request asked for, and the logprobs of the prompt tokens this step's chunks predict. A pipeline
        stage before the last returns the (hidden, residual) it hands on, one after the first starts from
        the ``intermediate`` one it was handed."""
        seqs, counts = batch.seqs, batch.num_new_tokens
        hidden = self._forward(batch, intermediate)
        if not pipeline_stage().is_last:
            return hidden
        if self.pooler is not None:   # each sequence of a pooling step is a whole prompt
            return StepOutput(pooled=self.pooler(hidden, counts, [s.params for s in seqs]))
        starts = list(accumulate(counts, initial=0))
        done = [i for i, (s, n) in enumerate(zip(seqs, counts))
                if s.num_computed_tokens + n == s.num_tokens + len(s.proposal)]
        speculating = [i for i in done if seqs[i].proposal]
        done = [i for i in done if not seqs[i].proposal]
        # A sequence's pending forks sample their first tokens from its logits, each with its own parameters.
        rows = done + [i for i in done for _ in seqs[i].pending_forks]
        samplers = [seqs[i] for i in done] + [child for i in done for child in seqs[i].pending_forks]
        prompt_slices = self.prompt_logprobs.plan(seqs, counts, starts)
        prompt_rows = [r for s in prompt_slices for r in range(s.row, s.row + s.count)]
        verified_rows = [r for i in speculating
                         for r in range(starts[i + 1] - 1 - len(seqs[i].proposal), starts[i + 1])]
        hidden_rows = [starts[i + 1] - 1 for i in rows] + prompt_rows + verified_rows
        if not hidden_rows:
            return StepOutput()
        logits = self.model.compute_logits(hidden[self._tensor(hidden_rows)]).float()
        out = StepOutput(prompt_logprobs=prompt_logprobs(logits[len(rows):len(rows) + len(prompt_rows)], prompt_slices))
        if rows:
            self._choose(samplers, logits[:len(rows)], batch.grammar, out)
        kept, kept_rows = [], []   # the tokens verifying sequences keep, and the verified rows that chose them
        if verified_rows:
            kept, kept_rows = self._verify([seqs[i] for i in speculating],
                                           logits[len(hidden_rows) - len(verified_rows):], batch.grammar, out)
        if self.medusa is not None:
            # The hidden state each sequence's newest token came from: a sampled row, or a verified one.
            sources = {seq: row for seq, row in zip(samplers, hidden_rows) if seq.beam is None}
            sources.update({seq: verified_rows[row] for (seq, _), row in zip(kept, kept_rows)})   # the last stays
            proposals = self.medusa.propose(hidden[self._tensor(list(sources.values()))]).tolist()
            for seq, tokens in zip(sources, proposals):
                seq.head_proposal = tokens
        return out

    def _forward(self, batch: ScheduledBatch, intermediate: tuple) -> torch.Tensor | tuple:
        """The step's block copies, a drafter's proposals, and the model's forward pass over the step's tokens."""
        for source, destination, pairs in ((self.kv_cache, self.host_kv_cache, batch.swap_outs),
                                           (self.kv_cache, self.kv_cache, batch.block_copies),
                                           (self.host_kv_cache, self.kv_cache, batch.swap_ins)):
            if pairs:
                self.backend.copy_blocks(source, destination, pairs)
        eagle = self.drafter if isinstance(self.drafter, EagleDrafter) else None
        if eagle is not None:
            eagle.copy_blocks(batch)
        if self.drafter is not None:
            self.drafter.propose([s for s in batch.seqs if s.proposal])
        metadata = self.backend.build_metadata(step_layout(batch))
        token_ids = [t for s, n in zip(batch.seqs, batch.num_new_tokens) for t in s.next_tokens(n)]
        if self.lora is not None:
            self.lora.prepare([s.lora_request for s in batch.seqs], batch.num_new_tokens)
        hidden = self.built.forward(self._tensor(token_ids), metadata, intermediate)
        if eagle is not None and pipeline_stage().is_last:
            eagle.keep_features(hidden, metadata)
        return hidden

    def _verify(self, verifiers: list[Sequence], logits: torch.Tensor, grammar: GrammarBitmask | None,
                out: StepOutput) -> tuple[list[tuple[Sequence, int]], list[int]]:
        """Keep the tokens of each verifier's proposal the target agrees with (``logits``: at its last token and
        each proposed one); returns them, and the row that chose each."""
        row_seqs = [seq for seq in verifiers for _ in range(len(seq.proposal) + 1)]
        masked = self.sampler.mask_grammar(logits, row_seqs, grammar)
        kept, out.accepted, kept_rows = verify(verifiers, masked, self.sampler.sampling_batch(row_seqs),
                                               self.ops.argmax)
        out.sampled += kept
        if any(seq.params.logprobs is not None for seq in verifiers):
            out.logprobs.update(kept_token_logprobs(logits, kept, kept_rows))
        return kept, kept_rows

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor, grammar: GrammarBitmask | None,
                out: StepOutput) -> None:
        """Sample each sequence's next token; beams report their most likely next tokens instead."""
        beams = [row for row, s in enumerate(seqs) if s.beam is not None]
        if beams:
            out.candidates = beam_candidates(logits[beams], [seqs[row] for row in beams])
            others = [row for row, s in enumerate(seqs) if s.beam is None]
            seqs, logits = [seqs[row] for row in others], logits[others]
        if seqs:
            out.sampled, out.logprobs = self.sampler(seqs, logits, grammar)

    def _tensor(self, values, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)
