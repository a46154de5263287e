"""What runs on the logits between the model and the sampler: penalties, logit_bias, bad words and grammar
bitmasks, and the logprobs of the raw logits. Every function works on a batch of rows at once; the sampler passes
only the rows that use a feature, so a batch without them pays nothing.
"""
from __future__ import annotations

import torch


def pad_ids(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[len(rows), longest] int64, right-padded with ``pad``."""
    width = max(map(len, rows), default=0)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)


def bin_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """How often each token occurs in each row of ``ids`` (padded with ``vocab``): [rows, vocab] int64."""
    counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids))[:, :vocab]


def apply_penalties(logits: torch.Tensor, prompt_ids: torch.Tensor | None, output_ids: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """vLLM's and OpenAI's penalties on float32 logits [rows, vocab].

    repetition (transformers' definition) divides positive and multiplies negative logits of every token seen
    in the prompt or the output; frequency subtracts ``penalty * count`` and presence ``penalty`` for every
    token of the output. ``prompt_ids`` may be None when no row has a repetition penalty.
    """
    vocab = logits.shape[-1]
    output_counts = bin_counts(output_ids, vocab)
    output_seen = output_counts > 0
    seen = output_seen if prompt_ids is None else output_seen | (bin_counts(prompt_ids, vocab) > 0)
    penalty = torch.where(seen, repetition[:, None], 1.0)
    logits = logits * torch.where(logits > 0, 1.0 / penalty, penalty)
    return logits - frequency[:, None] * output_counts - presence[:, None] * output_seen


def bad_word_bans(bad_words_ids: list[list[int]], output_ids: list[int]) -> list[int]:
    """Last tokens of the bad words whose other tokens end the output so far (one-token words: always)."""
    return [word[-1] for word in bad_words_ids
            if len(word) == 1 or output_ids[len(output_ids) - len(word) + 1:] == word[:-1]]


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[list[float]]:
    """Per row of log-probabilities [rows, vocab]: [logprob of token_ids[row], its rank, k top logprobs,
    their k ids], as one host list (one device sync). Rank 1 is the most likely; ties count against the
    token, as vLLM counts them."""
    chosen = logprobs.gather(-1, token_ids[:, None])
    ranks = (logprobs >= chosen).sum(-1, keepdim=True)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    # float32 holds ids and ranks exactly below 2**24, far above any vocabulary (and some devices lack float64).
    return torch.cat([chosen, ranks.float(), top_logprobs, top_ids.float()], dim=1).tolist()


def apply_token_bitmask(logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``logits`` [rows, vocab] with -inf wherever ``bits`` [rows, ceil(vocab / 32)] int32 (bit t % 32 of word
    t // 32: token t allowed, as xgrammar and llguidance pack them) does not allow the token."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :logits.shape[-1]]
    return logits.masked_fill(~allowed, float("-inf"))
