"""The only place logits become tokens: an ordered pipeline of logits processors, each on the rows that use it
(the min_tokens ban on stop tokens, bad_words, logit_bias, penalties, the grammar bitmask), then temperature,
top-k/top-p/min-p and sampling. Keeps each sequence's generator and bad words."""
from __future__ import annotations

from collections import Counter

import torch

from kvserve.core.engine.logprobs import TokenLogprobs
from kvserve.core.engine.sequence import Sequence
from kvserve.core.layers.logits_processors import (apply_penalties, apply_token_bitmask, bad_word_bans, pad_ids,
                                                    token_logprobs)
from kvserve.core.layers.sampler import SamplingBatch, sample
from kvserve.core.structured_outputs.manager import GrammarBitmask


class Sampler:
    def __init__(self, device: torch.device, argmax):
        self.device, self.argmax = device, argmax
        self.generators: dict[int, torch.Generator] = {}
        self.bad_words: dict[int, list[list[int]]] = {}    # seq_id -> token ids of each bad word

    def add(self, seq: Sequence, bad_words_token_ids: list[list[int]]) -> None:
        if bad_words_token_ids:
            self.bad_words[seq.seq_id] = bad_words_token_ids

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)
        self.bad_words.pop(seq.seq_id, None)

    def __call__(self, seqs: list[Sequence], logits: torch.Tensor, grammar: GrammarBitmask | None
                 ) -> tuple[list[tuple[Sequence, int]], dict[Sequence, list[TokenLogprobs]]]:
        """Each sequence's next token from its row of float32 ``logits``, and the logprobs of those that ask."""
        wants_logprobs = [row for row, s in enumerate(seqs) if s.params.logprobs is not None]
        raw_logprobs = logits[wants_logprobs].log_softmax(dim=-1) if wants_logprobs else None
        logits = self.process(logits, seqs, grammar)
        tokens = sample(logits, self.sampling_batch(seqs), self.argmax)
        sampled = list(zip(seqs, tokens.tolist()))
        logprobs = {}
        if wants_logprobs:
            width = max(seqs[row].params.logprobs for row in wants_logprobs)
            chosen = tokens[wants_logprobs]
            for row, values in zip(wants_logprobs, token_logprobs(raw_logprobs, chosen, width)):
                seq, token = sampled[row]
                logprobs[seq] = [TokenLogprobs.from_row(values, token, seq.params.logprobs, width)]
        return sampled, logprobs

    def process(self, logits: torch.Tensor, seqs: list[Sequence], grammar: GrammarBitmask | None) -> torch.Tensor:
        """The logits processors, in order, on the rows that use each."""
        ban_rows, ban_cols, bias_rows, bias_cols, biases = [], [], [], [], []
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                ban_rows += [row] * len(seq.stop_token_ids)
                ban_cols += seq.stop_token_ids
            if seq.seq_id in self.bad_words:
                banned = bad_word_bans(self.bad_words[seq.seq_id], seq.output_token_ids)
                ban_rows += [row] * len(banned)
                ban_cols += banned
            if seq.params.logit_bias:
                bias_rows += [row] * len(seq.params.logit_bias)
                bias_cols += seq.params.logit_bias.keys()
                biases += seq.params.logit_bias.values()
        if ban_rows:
            logits[self._tensor(ban_rows), self._tensor(ban_cols)] = float("-inf")
        if bias_rows:
            logits.index_put_((self._tensor(bias_rows), self._tensor(bias_cols)),
                              self._tensor(biases, torch.float32), accumulate=True)
        penalized = [row for row, seq in enumerate(seqs) if seq.params.uses_penalties]
        if penalized:
            params = [seqs[row].params for row in penalized]
            vocab, index = logits.shape[-1], self._tensor(penalized)
            output_ids = pad_ids([seqs[row].output_token_ids for row in penalized], vocab, self.device)
            prompt_ids = None if all(p.repetition_penalty == 1 for p in params) else pad_ids(
                [seqs[row].token_ids[:seqs[row].num_prompt_tokens] for row in penalized], vocab, self.device)
            penalties = [self._tensor([getattr(p, name) for p in params], torch.float32)
                         for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")]
            logits[index] = apply_penalties(logits[index], prompt_ids, output_ids, *penalties)
        return self.mask_grammar(logits, seqs, grammar)

    def mask_grammar(self, logits: torch.Tensor, row_seqs: list[Sequence], grammar: GrammarBitmask | None
                     ) -> torch.Tensor:
        """``logits`` with -inf where a constrained row's grammar forbids a token; ``row_seqs``: each row's
        sequence, a verifying one's once per position, in order. A new tensor where any row is constrained."""
        rows, bit_rows, positions = [], [], Counter()
        for row, seq in enumerate(row_seqs):
            if grammar is not None and seq.seq_id in grammar.rows:
                rows.append(row)
                bit_rows.append(grammar.rows[seq.seq_id] + positions[seq.seq_id])
                positions[seq.seq_id] += 1
        if not rows:
            return logits
        index, masked = self._tensor(rows), logits.clone()
        masked[index] = apply_token_bitmask(logits[index], grammar.bits[bit_rows].to(self.device))
        return masked

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        params = [s.params for s in seqs]
        generators = {}
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None and not seq.params.greedy:
                if seq.seq_id not in self.generators:
                    self.generators[seq.seq_id] = torch.Generator(self.device).manual_seed(seq.params.seed)
                generators[row] = self.generators[seq.seq_id]
        return SamplingBatch(
            temperatures=self._tensor([p.temperature for p in params], torch.float32),
            top_k=self._tensor([max(p.top_k, 0) for p in params], torch.int64),
            top_p=self._tensor([p.top_p for p in params], torch.float32),
            min_p=self._tensor([p.min_p for p in params], torch.float32),
            all_greedy=all(p.greedy for p in params),
            use_top_k=any(p.top_k > 0 for p in params),
            use_top_p=any(p.top_p < 1.0 for p in params),
            use_min_p=any(p.min_p > 0.0 for p in params),
            generators=generators,
        )

    def _tensor(self, values, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)
