"""The ``draft_model`` method of speculative decoding: a smaller model of the target's vocabulary proposes each
speculating sequence's next tokens, greedily, one forward pass per token, with its own paged KV cache.

Its cache has the target's block ids (a block holds the same positions in both), so the block manager and the
scheduler serve both. ``Sequence.draft_computed`` counts the positions whose draft keys and values are cached:
the first pass over a sequence computes those it lacks (the prompt, or the tokens accepted since it last
drafted), each later pass one drafted token. A proposal is a point mass on the draft's argmax, which is what
the rejection-sampling rule of ``speculation.verify`` takes it for.
"""
from __future__ import annotations

from itertools import accumulate

import torch

from kvserve.core.config import EngineConfig
from kvserve.core.engine.kv_cache import KvCache, bind_kv_scales, cache_block_bytes, cache_shape
from kvserve.core.engine.model_builder import BuiltModel, build_model
from kvserve.core.engine.sequence import Sequence
from kvserve.core.layers.ops import Ops
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.plugins.interfaces import StepLayout
from kvserve.plugins.manager import Platform


def check_draft(config: EngineConfig, checkpoint: Checkpoint, target_vocab_size: int) -> None:
    """A clear error for a draft of another vocabulary or of fewer positions than the target serves."""
    vocab_size = checkpoint.hf_config.vocab_size
    if vocab_size != target_vocab_size:
        raise ValueError(f"speculative_config model {checkpoint.path!r} has a vocabulary of {vocab_size} tokens, "
                         f"the target {target_vocab_size}: a draft model must share the target's tokenizer")
    if checkpoint.max_model_len < config.model.max_model_len:
        raise ValueError(f"speculative_config model {checkpoint.path!r} takes {checkpoint.max_model_len} "
                         f"positions, fewer than max_model_len={config.model.max_model_len}; lower "
                         f"max_model_len or pick a draft model with a longer context")


class DraftModel:
    captures_graphs = True

    def __init__(self, config: EngineConfig, platform: Platform, checkpoint: Checkpoint, model_cls: type, ops: Ops,
                 dtype: torch.dtype, target_vocab_size: int):
        check_draft(config, checkpoint, target_vocab_size)
        quantization = checkpoint.quantization(config.speculation.quantization)
        self._take(build_model(config, platform, checkpoint, model_cls, ops, dtype, quantization, None), config,
                   platform, ops)

    def _take(self, built: BuiltModel, config: EngineConfig, platform: Platform, ops: Ops) -> None:
        self.built, self.model, self.layers, self.spec, self.backend = (built, built.model, built.layers, built.spec,
                                                                         built.backend)
        self.block_bytes = cache_block_bytes(self.spec, self.backend, len(self.layers))
        self.ops, self.device, self.platform, self.config = ops, platform.device, platform, config
        self.kv_cache: torch.Tensor | None = None

    def allocate(self, cache: KvCache) -> None:
        """Its cache, of the target's blocks."""
        self.kv_cache = torch.zeros(cache_shape(self.spec, self.backend, len(self.layers), cache.num_blocks),
                                    dtype=self.spec.cache_dtype, device=self.device)
        self.built.bind(self.kv_cache)
        bind_kv_scales(self.layers, self.spec, calculate=False)
        if self.captures_graphs:   # its passes after the first are decodes, which the platform's graphs serve
            self.built.graph_runner = self.platform.graph_runner(self.model, self.backend, self.config)

    def propose(self, seqs: list[Sequence]) -> None:
        """Replace each sequence's proposal (placeholders, as many as it may take this step) with draft tokens;
        their slots are scheduled, so the draft's keys and values have somewhere to go."""
        drafted: dict[Sequence, list[int]] = {seq: [] for seq in seqs}
        while active := [s for s in seqs if len(drafted[s]) < len(s.proposal)]:
            inputs = {s: self._uncomputed(s, drafted[s]) for s in active}
            order = sorted(active, key=lambda s: len(inputs[s]) > 1)   # decodes first
            lens = [len(inputs[s]) for s in order]
            layout = StepLayout(lens, [s.draft_computed + n for s, n in zip(order, lens)],
                                [s.block_table for s in order], lens.count(1))
            metadata = self.backend.build_metadata(layout)
            input_ids = torch.tensor([t for s in order for t in inputs[s]], device=self.device)
            hidden = self.built.forward(input_ids, metadata)
            last_rows = torch.tensor(list(accumulate(lens)), device=self.device) - 1
            tokens = self.ops.argmax(self.model.compute_logits(hidden[last_rows]).float()).tolist()
            for seq, n, token in zip(order, lens, tokens):
                seq.draft_computed += n
                drafted[seq].append(token)
        for seq in seqs:
            seq.proposal = drafted[seq]

    @staticmethod
    def _uncomputed(seq: Sequence, drafted: list[int]) -> list[int]:
        start = seq.draft_computed
        return seq.token_ids[start:] + drafted[max(0, start - seq.num_tokens):]
