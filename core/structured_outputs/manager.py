"""Compiles each distinct constraint once, off the engine loop, and keeps each constrained sequence's matcher:
one bitmask a step for the rows that sample under a constraint, and the matchers advanced by the tokens they
take."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, TimeoutError, wait
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import torch

from kvserve.core.log import logger
from kvserve.core.structured_outputs.backends import Backend, GuidanceBackend, Matcher, XgrammarBackend
from kvserve.core.structured_outputs.params import StructuredOutputsParams
from kvserve.core.structured_outputs.reasoning import CONSTRAINED, DECIDING, THINKING, ReasoningGate

if TYPE_CHECKING:
    from kvserve.core.config import StructuredOutputsConfig
    from kvserve.core.engine.scheduler import ScheduledBatch
    from kvserve.core.engine.sequence import Sequence

BACKEND_CLASSES = {"xgrammar": XgrammarBackend, "guidance": GuidanceBackend}
CACHED_GRAMMARS = 256


@dataclass
class GrammarBitmask:
    """The tokens each constrained sequence of a step may sample, packed 32 to a word: ``bits[rows[seq_id] + i]``
    at the i-th position the step samples or verifies for it (after i of its proposed tokens)."""

    rows: dict[int, int]
    bits: torch.Tensor      # [positions, ceil(vocab / 32)] int32, on the CPU


def allow_token(row: torch.Tensor, token: int) -> None:
    """Set ``token``'s bit in a bitmask row of int32 words (bit 31 is the sign bit)."""
    bit = 1 << (token % 32)
    row[token // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit


class StructuredOutputManager:
    def __init__(self, config: StructuredOutputsConfig, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self.config = config
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, list(stop_token_ids)
        self.backends: dict[str, Backend] = {}
        self.lock, self.backend_lock = threading.Lock(), threading.Lock()
        self.compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()   # (kind, spec) -> its compilation
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvserve-grammar")
        self.matchers: dict[int, Matcher] = {}   # seq_id -> its matcher
        self.gate = ReasoningGate.for_parser(config.reasoning_parser, tokenizer)
        self.phases: dict[int, str] = {}         # seq_id -> where it is in its reasoning, with a gate
        self.held: dict[str, tuple] = {}         # request_id -> (compilation, since, sequences, params, prompt)

    def compile(self, params: StructuredOutputsParams) -> tuple[Backend, Any]:
        """(backend, compiled constraint), compiled once per distinct constraint on a worker thread; a ValueError
        if it is too large, fails to compile, or takes longer than the configured limit."""
        spec, limit = params.spec, self.config.max_bytes
        if len(spec.encode()) > limit:
            raise ValueError(f"structured_outputs.{params.kind} is {len(spec.encode())} bytes, over the limit of "
                             f"{limit} (structured_outputs_max_bytes)")
        try:
            return self._compilation(params).result(timeout=self.config.compile_timeout)
        except TimeoutError:
            raise self._too_slow(params) from None

    def _compilation(self, params: StructuredOutputsParams) -> Future:
        key = (params.kind, params.spec)
        with self.lock:
            future = self.compiled.get(key)
            if future is None:
                future = self.compiled[key] = self.pool.submit(self._compile, params)
                while len(self.compiled) > CACHED_GRAMMARS:
                    self.compiled.popitem(last=False)
            self.compiled.move_to_end(key)
        return future

    def _too_slow(self, params: StructuredOutputsParams) -> ValueError:
        return ValueError(f"compiling structured_outputs.{params.kind} took longer than {self.config.compile_timeout} "
                          "s (structured_outputs_compile_timeout); simplify the constraint")

    def hold(self, request_id: str, seqs: list[Sequence], params: StructuredOutputsParams,
             prompt_ids: list[int]) -> bool:
        """Give a request's sequences their matchers (True), or keep them while its constraint compiles (False)
        until ``take_compiled`` hands them back: the engine runs its other requests meanwhile."""
        future = self._compilation(params)
        if not future.done():
            self.held[request_id] = (future, time.monotonic(), seqs, params, prompt_ids)
            return False
        for seq in seqs:
            self.add(seq.seq_id, params, prompt_ids)
        return True

    def take_compiled(self) -> tuple[list[Sequence], dict[str, Exception]]:
        """The first sequences of the held requests whose constraints are compiled now, with their matchers, and
        the held requests whose constraints failed to compile or took too long, with why."""
        ready, failed = [], {}
        for request_id, (future, since, seqs, params, prompt_ids) in list(self.held.items()):
            if future.done() or time.monotonic() - since > self.config.compile_timeout:
                del self.held[request_id]
                try:
                    for seq in seqs:
                        self.add(seq.seq_id, params, prompt_ids)
                    ready.append(seqs[0])
                except ValueError as exc:
                    failed[request_id] = exc
        return ready, failed

    def wait_for_held(self, timeout: float) -> None:
        wait([entry[0] for entry in self.held.values()], timeout, return_when=FIRST_COMPLETED)

    def add(self, seq_id: int, params: StructuredOutputsParams, prompt_ids: list[int]) -> None:
        future = self._compilation(params)
        if not future.done():
            raise self._too_slow(params)
        backend, compiled = future.result()
        self.matchers[seq_id] = backend.matcher(compiled)
        self.phases[seq_id] = CONSTRAINED if self.gate is None else self.gate.initial(prompt_ids)

    def release(self, request_id: str, seq_id: int) -> None:
        self.held.pop(request_id, None)
        self.matchers.pop(seq_id, None)
        self.phases.pop(seq_id, None)

    def trim_proposals(self, seqs: list[Sequence]) -> None:
        """Cut each constrained sequence's proposal before its first token the grammar forbids (a thinking one's
        before the end of its reasoning)."""
        for seq in seqs:
            if seq.proposal and seq.seq_id in self.matchers:
                if self.phases[seq.seq_id] == CONSTRAINED:
                    seq.proposal = seq.proposal[:self.matchers[seq.seq_id].valid_prefix(seq.proposal)]
                else:
                    seq.proposal = self.gate.thinking_part(seq.proposal)

    def bitmask(self, batch: ScheduledBatch) -> GrammarBitmask | None:
        """The allowed tokens of the constrained sequences that sample this step (at each position of a
        proposal they verify), and of their pending forks."""
        if not self.matchers:
            return None
        sampling = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n >= s.num_tokens]
        seqs = [s for s in sampling + [c for s in sampling for c in s.pending_forks]
                if s.seq_id in self.matchers and self.phases[s.seq_id] != THINKING]
        if not seqs:
            return None
        starts = list(accumulate((len(s.proposal) + 1 for s in seqs), initial=0))
        bits = torch.full((starts[-1], (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        for seq, start in zip(seqs, starts):
            matcher = self.matchers[seq.seq_id]
            for i, token in enumerate(seq.proposal + [None]):
                if not matcher.is_terminated():   # after a proposed stop token: a position the output ends before
                    matcher.fill(bits, start + i)
                if token is not None:
                    matcher.accept(token)
            matcher.rollback(len(seq.proposal))
            if self.phases[seq.seq_id] == DECIDING:   # the first token may open the reasoning instead
                allow_token(bits[start], self.gate.start_id)
        return GrammarBitmask({seq.seq_id: start for seq, start in zip(seqs, starts)}, bits)

    def accept(self, seq_id: int, token: int) -> bool:
        """Advance the sequence's matcher by its new token (in its reasoning, its phase); whether its output is
        now complete."""
        matcher = self.matchers.get(seq_id)
        if matcher is None:
            return False
        phase = self.phases[seq_id]
        if phase != CONSTRAINED:
            self.phases[seq_id] = self.gate.after(phase, token)
            if phase == THINKING or self.phases[seq_id] == THINKING:
                return False
        if not matcher.accept(token):
            logger.error("sequence %d sampled token %d, which its grammar does not allow; ending it", seq_id, token)
            return True
        return matcher.is_terminated()

    def _compile(self, params: StructuredOutputsParams) -> tuple[Backend, Any]:
        names = ("xgrammar", "guidance") if self.config.backend == "auto" else (self.config.backend,)
        errors = []
        for name in names:
            backend = self._backend(name)
            try:
                return backend, backend.compile(params)
            except ValueError as exc:
                errors.append(exc)
        raise errors[0]

    def _backend(self, name: str) -> Backend:
        with self.backend_lock:
            if name not in self.backends:
                self.backends[name] = BACKEND_CLASSES[name](self.tokenizer, self.vocab_size, self.stop_token_ids)
            return self.backends[name]
