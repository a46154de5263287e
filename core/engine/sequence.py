"""A request's tokens and progress, as the scheduler and block manager see them (no tensors)."""
from __future__ import annotations

import copy
from enum import Enum, auto
from itertools import count
from typing import TYPE_CHECKING

from kvserve.core.pooling_params import PoolingParams
from kvserve.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvserve.core.engine.beam_search import BeamSearch
    from kvserve.core.lora.request import LoRARequest


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    SWAPPED = auto()      # preempted, its blocks copied to host memory
    FINISHED = auto()


class Sequence:
    _ids = count()

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | PoolingParams,
                 max_model_len: int, eos_token_ids: list[int], lora_request: LoRARequest | None = None):
        """A pooled prompt (``params`` a PoolingParams) generates nothing: it finishes once computed. ``lora_request``:
        the adapter it runs with, if any."""
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.lora_request = lora_request
        pooled = isinstance(params, PoolingParams)
        self.eos_token_ids = [] if pooled or params.ignore_eos else list(eos_token_ids)
        limit = max_model_len if pooled or params.max_tokens is None else self.num_prompt_tokens + params.max_tokens
        self.max_total_tokens = min(limit, max_model_len)
        self.num_computed_tokens = 0       # tokens whose keys/values are in the cache (computed or prefix hits)
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash-chain value of each full block of block_table, in order
        self.host_blocks: list[int] = []   # where its blocks are while swapped out
        self.status = SequenceStatus.WAITING
        # Siblings that share this sequence's prompt: each samples its first token from this sequence's last
        # prompt logits, then forks its blocks, so the prompt is computed once for all of them.
        self.pending_forks: list[Sequence] = []
        self.beam: BeamSearch | None = None   # the beam search this sequence is a beam of
        self.proposal: list[int] = []         # speculated next tokens this step verifies, not yet its own
        self.draft_computed = 0               # positions whose keys and values a draft model has cached
        self.head_proposal: list[int] = []    # Medusa heads' tokens from the hidden state its last token came from
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def num_seqs(self) -> int:
        """Sequences this one stands for in the running set once its forks (or beams) are made."""
        if self.beam is not None and not self.beam.generated:
            return self.beam.width
        return 1 + len(self.pending_forks)

    def clone(self) -> Sequence:
        """A new sequence with the same tokens and progress, holding no blocks yet."""
        twin = copy.copy(self)
        twin.seq_id = next(Sequence._ids)
        twin.token_ids = list(self.token_ids)
        twin.block_table, twin.block_hashes, twin.host_blocks, twin.pending_forks = [], [], [], []
        # Its blocks' draft entries are not copied; its first token is sampled afresh.
        twin.proposal, twin.draft_computed, twin.head_proposal = [], 0, []
        return twin

    @property
    def lora_id(self) -> int:
        """Its adapter's id; 0 without one."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end this sequence: EOS (unless ignored) and the request's stop_token_ids."""
        return self.eos_token_ids + list(self.params.stop_token_ids or [])

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def next_tokens(self, n: int) -> list[int]:
        """The ``n`` tokens a step computes for it: its uncomputed ones, then its proposal."""
        return (self.token_ids[self.num_computed_tokens:] + self.proposal)[:n]

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
