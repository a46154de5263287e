"""Where a constraint starts in a reasoning model's output: after the reasoning that the reasoning parser's tags
delimit, so that the model thinks freely and its answer follows the constraint."""
from __future__ import annotations

from kvserve.core.log import logger

THINKING, DECIDING, CONSTRAINED = "thinking", "deciding", "constrained"


class ReasoningGate:
    """Each constrained sequence's phase: THINKING (no mask) until the end tag, DECIDING at the first token of a
    parser whose reasoning must open with the start tag (the grammar's tokens or the start tag), CONSTRAINED after.
    The tags are token ids: reasoning models' tokenizers have them as single tokens."""

    def __init__(self, start_id: int, end_id: int, starts_in_reasoning: bool):
        self.start_id, self.end_id, self.starts_in_reasoning = start_id, end_id, starts_in_reasoning

    @classmethod
    def for_parser(cls, name: str | None, tokenizer) -> ReasoningGate | None:
        """The gate of reasoning parser ``name`` (plugins' too), or None without one; a parser whose tags are not
        single tokens of ``tokenizer`` gets none, and constraints apply from the first token."""
        if name is None:
            return None
        from kvserve.core.entrypoints.openai.reasoning_parsers import get_reasoning_parser

        parser = get_reasoning_parser(name)
        vocab = tokenizer.get_vocab()
        start, end = (vocab.get(getattr(parser, tag, None)) for tag in ("start_tag", "end_tag"))
        if start is None or end is None:
            logger.warning("reasoning parser %s's tags are not single tokens of this model's vocabulary: "
                           "structured outputs apply from the first token, reasoning included", name)
            return None
        return cls(start, end, parser.starts_in_reasoning)

    def initial(self, prompt_ids: list[int]) -> str:
        """A new sequence's phase: a template may have opened the reasoning, or opened and closed it."""
        if not self.starts_in_reasoning:
            return DECIDING
        last = {token: i for i, token in enumerate(prompt_ids)}
        return CONSTRAINED if last.get(self.end_id, -1) > last.get(self.start_id, -1) else THINKING

    def after(self, phase: str, token: int) -> str:
        """The phase once ``token`` is taken (in DECIDING, a token other than the start tag is the grammar's)."""
        if phase == THINKING:
            return CONSTRAINED if token == self.end_id else THINKING
        if phase == DECIDING:
            return THINKING if token == self.start_id else CONSTRAINED
        return phase

    def thinking_part(self, proposal: list[int]) -> list[int]:
        """A thinking sequence's proposal up to, not including, the end tag: the position after it is the
        grammar's, whose mask the step has not made."""
        return proposal[:proposal.index(self.end_id)] if self.end_id in proposal else proposal
