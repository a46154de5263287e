"""What the engine keeps for each request between steps, and the output it gives from that."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvserve.core.engine.beam_search import BeamSearch, Hypothesis
from kvserve.core.engine.detokenizer import IncrementalDetokenizer
from kvserve.core.engine.sequence import Sequence
from kvserve.core.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from kvserve.core.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class RequestState:
    request_id: str
    params: SamplingParams | BeamSearchParams
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detokenizers: dict[int, IncrementalDetokenizer] = field(default_factory=dict)   # by seq_id
    logprobs: dict[int, list[PositionLogprobs]] = field(default_factory=dict)   # by seq_id, if asked for
    cumulative_logprobs: dict[int, float] = field(default_factory=dict)   # by seq_id, for logprobs or best_of
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    beam: BeamSearch | None = None

    @property
    def finished(self) -> bool:
        return self.beam.done if self.beam is not None else all(s.is_finished for s in self.seqs)

    @property
    def streams(self) -> bool:
        """Whether it gives outputs while running; not when the result is chosen at the end (best_of, beams)."""
        return self.beam is None and self.params.num_samples == self.params.n

    def output(self, tokenizer) -> RequestOutput:
        completions = self._beam_completions(tokenizer) if self.beam is not None else self._sampled_completions()
        prompt_logprobs = None if self.prompt_logprobs is None else list(self.prompt_logprobs)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions, self.finished,
                             prompt_logprobs, self.seqs[0].lora_request)

    def _sampled_completions(self) -> list[CompletionOutput]:
        completions, seqs = [], self.seqs
        if len(seqs) > self.params.n:   # best_of: the n most likely samples, best first
            seqs = sorted(seqs, key=lambda s: -self.cumulative_logprobs[s.seq_id])[:self.params.n]
        for index, seq in enumerate(seqs):
            text = self.detokenizers[seq.seq_id].text
            held_back = max((len(s) for s in seq.params.stop_strings), default=1) - 1
            if held_back and not seq.is_finished:   # a stop string may still complete here: don't emit it yet
                text = text[:max(0, len(text) - held_back)]
            logprobs = self.logprobs.get(seq.seq_id)
            completions.append(CompletionOutput(index, text, seq.output_token_ids, seq.finish_reason,
                                                seq.stop_reason, self.cumulative_logprobs.get(seq.seq_id),
                                                None if logprobs is None else list(logprobs)))
        return completions

    def _beam_completions(self, tokenizer) -> list[CompletionOutput]:
        return [CompletionOutput(index, self._beam_text(tokenizer, hypothesis), hypothesis.token_ids,
                                 "stop" if hypothesis.ended_by_eos else "length", None,
                                 hypothesis.cumulative_logprob)
                for index, hypothesis in enumerate(self.beam.results())]

    def _beam_text(self, tokenizer, hypothesis: Hypothesis) -> str:
        """The hypothesis' text without its EOS token, decoded as a sampled completion's would be."""
        detokenizer = IncrementalDetokenizer(tokenizer, self.prompt_token_ids, skip_special_tokens=True)
        for token in hypothesis.token_ids[:-1] if hypothesis.ended_by_eos else hypothesis.token_ids:
            detokenizer.add(token)
        return detokenizer.text
