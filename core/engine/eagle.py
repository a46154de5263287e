"""The ``eagle`` method of speculative decoding: EAGLE's draft (models/eagle.py) proposes each speculating
sequence's next tokens, greedily, from the target's hidden states and the tokens after them.

Its entry at position p pairs the target's hidden state there with the token at p + 1, so its first pass over a
sequence covers the positions from ``Sequence.draft_computed`` to the one before the newest token, and each later
pass one drafted token, paired with the draft's own hidden state before it. The target's hidden states wait in a
paged cache of the target's blocks (a function of the tokens up to their position, as keys and values are, so
that prefix-cache hits, copies on write and swaps keep them). The draft's keys and values go in its own cache of
those blocks; its entries past the target's last hidden state are recomputed from the target's next time.
Sequences that share a block through the prefix cache share its draft entries too, and a block's last entry pairs
a hidden state with the next block's first token: where two diverge at a block's end, one may draft from the
other's entry there, which costs acceptance, never output.
"""
from __future__ import annotations

import functools
from itertools import accumulate

import torch
from torch import nn

from kvserve.core.config import EngineConfig
from kvserve.core.engine.draft_model import DraftModel, check_draft
from kvserve.core.engine.kv_cache import KvCache
from kvserve.core.engine.model_builder import build_model
from kvserve.core.engine.scheduler import ScheduledBatch
from kvserve.core.engine.sequence import Sequence
from kvserve.core.layers.ops import Ops
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.models.eagle import EagleLlama
from kvserve.plugins.interfaces import AttentionMetadata, StepLayout
from kvserve.plugins.manager import Platform


def _check_eagle(checkpoint: Checkpoint, target_config) -> None:
    config, path = checkpoint.hf_config, checkpoint.path
    if getattr(config, "draft_vocab_size", None) not in (None, config.vocab_size):
        raise ValueError(f"{path!r} is an EAGLE-3 draft (draft_vocab_size={config.draft_vocab_size}); the eagle "
                         f"method runs EAGLE-1 drafts, which predict the target's vocabulary")
    if config.hidden_size != target_config.hidden_size:
        raise ValueError(f"the EAGLE draft {path!r} takes hidden states of {config.hidden_size}; the target's "
                         f"have {target_config.hidden_size}")
    if checkpoint.own_quantization is not None:
        raise ValueError(f"the EAGLE draft {path!r} is quantized ({checkpoint.own_quantization}); the eagle method "
                         f"runs drafts in the target's dtype")


class EagleDrafter(DraftModel):
    captures_graphs = False   # its passes take hidden states besides tokens, which the platforms' graphs do not

    def __init__(self, config: EngineConfig, platform: Platform, target: nn.Module, target_config, ops: Ops,
                 dtype: torch.dtype):
        if not getattr(target, "eagle_target", False):
            raise ValueError(f"EAGLE drafts run on Llama-family targets (Llama, Mistral, Qwen2, Qwen3 and their "
                             f"mixtures of experts, Phi-3), whose embedding and head they share; not on "
                             f"{type(target).__name__}: use method 'draft_model' or 'ngram'")
        checkpoint = Checkpoint.open(config.speculation.source(config.model))
        check_draft(config, checkpoint, target_config.vocab_size)
        _check_eagle(checkpoint, target_config)
        weights = dict(checkpoint.weights())
        model_cls = functools.partial(EagleLlama, fc_bias="fc.bias" in weights,
                                      qkv_bias=any(name.endswith("q_proj.bias") for name in weights))
        built = build_model(config, platform, checkpoint, model_cls, ops, dtype, None, None, weights.items())
        built.model.share(target)
        self._take(built, config, platform, ops)
        self.hidden_size, self.dtype, self.block_size = target_config.hidden_size, dtype, config.cache.block_size
        self.block_bytes += self.block_size * self.hidden_size * dtype.itemsize
        self.features = self.host_features = None

    def allocate(self, cache: KvCache) -> None:
        """Its caches of keys and values and of the target's hidden states; a host copy of the latter for swaps."""
        super().allocate(cache)
        self.features = torch.zeros(cache.num_blocks * self.block_size, self.hidden_size, dtype=self.dtype,
                                    device=self.device)
        if cache.num_host_blocks:
            self.host_features = torch.zeros(cache.num_host_blocks * self.block_size, self.hidden_size,
                                             dtype=self.dtype, pin_memory=self.device.type != "cpu")

    def copy_blocks(self, batch: ScheduledBatch) -> None:
        """The hidden states of the blocks the step swaps out, copies on write, and swaps in, in that order."""
        for source, destination, pairs in ((self.features, self.host_features, batch.swap_outs),
                                           (self.features, self.features, batch.block_copies),
                                           (self.host_features, self.features, batch.swap_ins)):
            if pairs:
                blocks = torch.tensor(pairs).T
                source_blocks, destination_blocks = (cache.view(-1, self.block_size, self.hidden_size)
                                                     for cache in (source, destination))
                destination_blocks[blocks[1]] = source_blocks[blocks[0]].to(destination.device)

    def keep_features(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> None:
        """Cache the target's hidden state at each of the step's tokens."""
        self.features[metadata.slot_mapping] = hidden

    def propose(self, seqs: list[Sequence]) -> None:
        """Replace each sequence's proposal (placeholders, as many as it may take this step, the sequence at
        least two tokens long) with draft tokens; their slots are scheduled, for the draft's keys and values."""
        if not seqs:
            return
        for seq in seqs:   # the first pass has a row for each at least: the pair before its newest token
            seq.draft_computed = min(seq.draft_computed, seq.num_tokens - 2)
        order = sorted(seqs, key=lambda s: s.num_tokens - s.draft_computed > 2)   # decodes first
        lens = [seq.num_tokens - 1 - seq.draft_computed for seq in order]
        metadata = self.backend.build_metadata(StepLayout(lens, [seq.num_tokens - 1 for seq in order],
                                                          [seq.block_table for seq in order], lens.count(1)))
        input_ids = self._tensor([t for seq in order for t in seq.token_ids[seq.draft_computed + 1:]])
        hidden = self.model(input_ids, metadata.positions, metadata, self.features[metadata.slot_mapping])
        hidden = hidden[self._tensor(list(accumulate(lens))) - 1]
        drafted: dict[Sequence, list[int]] = {seq: [] for seq in order}
        active = order
        while True:
            for seq, token in zip(active, self.ops.argmax(self.model.compute_logits(hidden).float()).tolist()):
                drafted[seq].append(token)
            going = [row for row, seq in enumerate(active) if len(drafted[seq]) < len(seq.proposal)]
            if not going:
                break
            active, hidden = [active[row] for row in going], hidden[self._tensor(going)]
            metadata = self.backend.build_metadata(StepLayout(
                [1] * len(active), [seq.num_tokens - 1 + len(drafted[seq]) for seq in active],
                [seq.block_table for seq in active], len(active)))
            input_ids = self._tensor([drafted[seq][-1] for seq in active])
            hidden = self.model(input_ids, metadata.positions, metadata, hidden)
        for seq in order:
            seq.proposal, seq.draft_computed = drafted[seq], seq.num_tokens - 1

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)
