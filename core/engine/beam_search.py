"""Beam search over sequences that share blocks, deciding each step as transformers' ``_beam_search`` does.

The beams run as ordinary sequences. When a beam's last token is computed, the model runner reports its most
likely next tokens instead of sampling one; once every beam has reported, ``advance`` picks the next beams:
a beam chosen more than once is forked (its blocks shared, a partial last block copied on write), a beam not
chosen is dropped. The arithmetic mirrors transformers in float32, so both choose the same beams.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.core.engine.sequence import Sequence
from kvserve.core.sampling_params import BeamSearchParams

# transformers' score for a choice that must lose; kept in the same float32 arithmetic so ties break alike.
LOSING = -1.0e9


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens and their summed logprob."""

    token_ids: list[int]
    cumulative_logprob: float
    ended_by_eos: bool


class BeamSearch:
    def __init__(self, params: BeamSearchParams, first: Sequence, eos_token_ids: list[int], max_model_len: int):
        self.params = params
        self.width = params.beam_width
        self.eos = torch.tensor([] if params.ignore_eos else eos_token_ids, dtype=torch.int64)
        # Enough candidates that `width` of them remain even if the best ones all end with an EOS token.
        self.num_candidates = max(2, 1 + len(self.eos)) * self.width
        limit = max_model_len - first.num_prompt_tokens
        self.max_generated = limit if params.max_tokens is None else min(params.max_tokens, limit)
        self.beams = [first]
        self.scores = torch.zeros(1)                       # summed logprob of each running beam, best first
        self.generated = 0
        self.finished_scores = torch.full((self.width,), LOSING)
        self.is_finished = torch.zeros(self.width, dtype=torch.bool)
        self.hypotheses: list[Hypothesis | None] = [None] * self.width
        self.improvable = True
        self.done = False
        self.reports: dict[Sequence, tuple[list[int], list[float]]] = {}
        first.beam = self

    def report(self, beam: Sequence, token_ids: list[int], logprobs: list[float]) -> None:
        """A beam's most likely next tokens and their logprobs, best first."""
        self.reports[beam] = (token_ids, logprobs)

    @property
    def ready(self) -> bool:
        return len(self.reports) == len(self.beams)

    def advance(self, scheduler) -> None:
        """Choose the next beams from every beam's report, and record the hypotheses that just finished."""
        token_ids = torch.tensor([self.reports[b][0] for b in self.beams], dtype=torch.int64)
        logprobs = torch.tensor([self.reports[b][1] for b in self.beams], dtype=torch.float32)
        self.reports = {}
        width, per_beam = self.width, token_ids.shape[1]
        accumulated = (self.scores[:, None] + logprobs).flatten()
        top_scores, flat = accumulated.topk(min(self.num_candidates, accumulated.numel()))
        parents, tokens = flat // per_beam, token_ids.flatten()[flat]
        self.generated += 1
        hits = torch.isin(tokens, self.eos) | (self.generated >= self.max_generated)

        running = top_scores + hits.to(torch.float32) * LOSING
        keep = running.topk(width).indices
        self._record_finished(top_scores, hits, parents, tokens)
        self.scores = running[keep]
        self._update_early_stop()
        self.done = not (self.improvable and not (bool(self.is_finished.all()) and self.params.early_stopping is True)
                         and not bool(hits.all()))
        if self.done:
            for beam in self.beams:
                scheduler.remove(beam)
        else:
            self._rebeam(scheduler, [self.beams[p] for p in parents[keep].tolist()], tokens[keep].tolist())

    def results(self) -> list[Hypothesis]:
        """The finished hypotheses, best first."""
        return [h for h, finished in zip(self.hypotheses, self.is_finished.tolist()) if finished]

    def _record_finished(self, top_scores, hits, parents, tokens) -> None:
        """Merge the candidates that just finished among the top `width` into the `width` best hypotheses."""
        just_finished = hits & (torch.arange(len(hits)) < self.width)
        scores = top_scores / (self.generated ** self.params.length_penalty)
        full = bool(self.is_finished.all()) and self.params.early_stopping is True
        scores = scores + float(full) * LOSING
        scores = scores + float(not self.improvable) * LOSING
        scores = scores + (~just_finished).to(torch.float32) * LOSING
        merged_scores = torch.cat([self.finished_scores, scores])
        merged_flags = torch.cat([self.is_finished, just_finished])
        best = merged_scores.topk(self.width).indices
        hypotheses = []
        for index in best.tolist():
            if index < self.width:
                hypotheses.append(self.hypotheses[index])
            else:
                c = index - self.width
                parent, token = self.beams[int(parents[c])], int(tokens[c])
                hypotheses.append(Hypothesis(parent.output_token_ids + [token], float(top_scores[c]),
                                             bool(torch.isin(tokens[c], self.eos))))
        self.hypotheses = hypotheses
        self.finished_scores, self.is_finished = merged_scores[best], merged_flags[best]

    def _update_early_stop(self) -> None:
        """Whether a running beam could still beat the worst finished hypothesis (transformers' heuristic)."""
        penalty = self.params.length_penalty
        never = self.params.early_stopping == "never" and penalty > 0
        best_length = self.max_generated if never else self.generated
        best_possible = self.scores[0] / (best_length ** penalty)
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(), LOSING)
        self.improvable = self.improvable and bool((best_possible > worst_finished).any())

    def _rebeam(self, scheduler, parents: list[Sequence], tokens: list[int]) -> None:
        """Continue each chosen parent with its token: the first choice of a parent extends it, each further
        one forks it first; parents not chosen are dropped."""
        beams, extended = [], set()
        for parent in parents:
            if parent in extended:
                child = parent.clone()
                scheduler.fork(parent, child)
                beams.append(child)
            else:
                extended.add(parent)
                beams.append(parent)
        for beam in self.beams:
            if beam not in extended:
                scheduler.remove(beam)
        for beam, token in zip(beams, tokens):
            beam.token_ids.append(token)
        self.beams = beams


def beam_candidates(logits: torch.Tensor, beams: list[Sequence]) -> dict[Sequence, tuple[list[int], list[float]]]:
    """Each beam's most likely next tokens and their float32 logprobs (of its logits over its temperature,
    if above 0), best first, in one transfer to the host."""
    temperatures = torch.tensor([b.params.temperature or 1.0 for b in beams], device=logits.device)
    logprobs = (logits / temperatures[:, None]).log_softmax(dim=-1)
    width = min(max(b.beam.num_candidates for b in beams), logprobs.shape[-1])
    values, ids = logprobs.topk(width, dim=-1)
    # float32 holds token ids exactly below 2**24, far above any vocabulary.
    rows = torch.cat([values, ids.float()], dim=1).tolist()
    reports = {}
    for beam, row in zip(beams, rows):
        k = min(beam.beam.num_candidates, width)
        reports[beam] = ([int(i) for i in row[width:width + k]], row[:k])
    return reports
