"""Logprobs: which prompt positions each step computes them for, the runner's numbers for one position (of
speculating sequences' kept tokens too), and vLLM's {token id: Logprob} dict of them."""
from __future__ import annotations

from typing import NamedTuple

import torch

from kvserve.core.engine.sequence import Sequence
from kvserve.core.layers.logits_processors import token_logprobs
from kvserve.core.outputs import Logprob


class TokenLogprobs(NamedTuple):
    """One position: the actual token's logprob and rank, and the top-k (ids, logprobs) in rank order."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]

    @classmethod
    def from_row(cls, row: list[float], token_id: int, k: int, width: int) -> TokenLogprobs:
        """From a row of ``logits_processors.token_logprobs`` computed with ``width`` >= k top entries."""
        top = row[2:2 + k]
        ids = [int(i) for i in row[2 + width:2 + width + k]]
        return cls(token_id, row[0], int(row[1]), ids, top)


class LogprobsBuilder:
    """Builds the dicts, decoding each token id once per engine (``decoded_token`` is ``decode([id])``)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.texts: dict[int, str] = {}

    def __call__(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        ids = [entry.token_id, *entry.top_ids]
        missing = list({i for i in ids if i not in self.texts})
        if missing:
            self.texts.update(zip(missing, self.tokenizer.batch_decode([[i] for i in missing])))
        # The actual token first, then the top-k; a top-k token that is also the actual one keeps its top-k rank.
        entries = {entry.token_id: Logprob(entry.logprob, entry.rank, self.texts[entry.token_id])}
        for rank, (token, logprob) in enumerate(zip(entry.top_ids, entry.top_logprobs), 1):
            entries[token] = Logprob(logprob, rank, self.texts[token])
        return entries


class PromptSlice(NamedTuple):
    """Prompt tokens first .. first + count - 1 of seq, predicted by batch rows row .. row + count - 1."""

    seq: Sequence
    first: int
    count: int
    row: int


class PromptLogprobsPlanner:
    """Which prompt tokens' logprobs a step computes: those its chunks predict, each once (a chunk computed
    again after a preemption gives none twice)."""

    def __init__(self):
        self.next: dict[int, int] = {}     # seq_id -> the next prompt token whose logprobs are due

    def add(self, seq: Sequence) -> None:
        if seq.params.prompt_logprobs is not None:
            self.next[seq.seq_id] = 1      # the first prompt token has none: nothing predicts it

    def release(self, seq: Sequence) -> None:
        self.next.pop(seq.seq_id, None)

    def plan(self, seqs: list[Sequence], counts: list[int], starts: list[int]) -> list[PromptSlice]:
        due = []
        for seq, n, start in zip(seqs, counts, starts) if self.next else ():
            first = self.next.get(seq.seq_id, seq.num_prompt_tokens)
            if first >= seq.num_prompt_tokens:
                continue
            computed = seq.num_computed_tokens   # never past `first`: such requests skip the prefix cache
            last = min(computed + n, seq.num_prompt_tokens - 1)   # the last prompt position predicts an output
            if last >= first:
                due.append(PromptSlice(seq, first, last - first + 1, start + first - 1 - computed))
            self.next[seq.seq_id] = max(first, last + 1)
        return due


def prompt_logprobs(logits: torch.Tensor, slices: list[PromptSlice]) -> dict[Sequence, tuple[int, list[TokenLogprobs]]]:
    """seq -> (its first prompt token here, the entries from there on), from the raw logits of the slices' rows."""
    if not slices:
        return {}
    targets = [t for s in slices for t in s.seq.token_ids[s.first:s.first + s.count]]
    width = max(s.seq.params.prompt_logprobs for s in slices)
    values = token_logprobs(logits.log_softmax(dim=-1), torch.tensor(targets, device=logits.device), width)
    out, offset = {}, 0
    for s in slices:
        rows = zip(values[offset:offset + s.count], targets[offset:offset + s.count])
        out[s.seq] = (s.first, [TokenLogprobs.from_row(row, t, s.seq.params.prompt_logprobs, width) for row, t in rows])
        offset += s.count
    return out


def kept_token_logprobs(logits: torch.Tensor, kept: list[tuple[Sequence, int]],
                        rows: list[int]) -> dict[Sequence, list[TokenLogprobs]]:
    """The logprobs of each token (``kept``, in order) that a verifying sequence asking for them keeps, from the
    row of ``logits`` that chose it (``rows``, as ``speculation.verify`` gives them)."""
    wanted = [(seq, token, row) for (seq, token), row in zip(kept, rows) if seq.params.logprobs is not None]
    width = max(seq.params.logprobs for seq, _, _ in wanted)
    index = torch.tensor([row for _, _, row in wanted], device=logits.device)
    values = token_logprobs(logits[index].log_softmax(dim=-1),
                            torch.tensor([token for _, token, _ in wanted], device=logits.device), width)
    entries: dict[Sequence, list[TokenLogprobs]] = {}
    for (seq, token, _), row in zip(wanted, values):
        entries.setdefault(seq, []).append(TokenLogprobs.from_row(row, token, seq.params.logprobs, width))
    return entries
