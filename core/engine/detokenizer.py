"""Incremental detokenization that never emits half of a multi-byte character."""
from __future__ import annotations

# Decoding starts a few prompt tokens back, so that the first output token gets the leading
# space (or byte continuation) it would have in the full text.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completes (empty while a character is still partial)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Once no more tokens come: the text held back for a character its last tokens leave unfinished."""
        delta = self._decode(self.ids[self.prefix_offset:])[len(self._decode(self.ids[self.prefix_offset:
                                                                                       self.read_offset])):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
