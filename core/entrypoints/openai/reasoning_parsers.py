"""Reasoning parsers, by the name ``--reasoning-parser`` takes: they split a response into the model's reasoning
(``reasoning_content``) and its answer (``content``)."""
from __future__ import annotations

from typing import Any, ClassVar

from kvserve.core.entrypoints.openai.tool_parsers import ParserRegistry
from kvserve.core.entrypoints.openai.tool_parsers.base import partial_marker_length


class ReasoningStream:
    """Splits one response a piece at a time, holding back text that may be the start of a tag until it is
    decided; the pieces join up to what ``ReasoningParser.extract`` gives for the whole text."""

    def __init__(self, start_tag: str, end_tag: str, starts_in_reasoning: bool):
        self.start_tag, self.end_tag = start_tag, end_tag
        self.starts_in_reasoning = starts_in_reasoning
        self.mode = "start"
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, str]:
        """Read the next piece of generated text; returns (reasoning piece, content piece)."""
        self.pending += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        """End of generation: returns whatever was held back, as (reasoning piece, content piece)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning = ""
        if self.mode == "start":
            text = self.pending.lstrip()
            if text.startswith(self.start_tag):
                self.pending, self.mode = text[len(self.start_tag):], "reasoning"
            elif self.start_tag.startswith(text) and not final:
                return "", ""
            else:
                self.mode = "reasoning" if self.starts_in_reasoning else "content"
        if self.mode == "reasoning":
            at = self.pending.find(self.end_tag)
            if at < 0:
                keep = 0 if final else partial_marker_length(self.pending, self.end_tag)
                cut = len(self.pending) - keep
                reasoning, self.pending = self.pending[:cut], self.pending[cut:]
                return reasoning, ""
            reasoning, self.pending = self.pending[:at], self.pending[at + len(self.end_tag):]
            self.mode = "content"
        content, self.pending = self.pending, ""
        return reasoning, content


class ReasoningParser:
    """Splits a response into reasoning, between ``start_tag`` and ``end_tag``, and content after them.

    With ``starts_in_reasoning`` the response is reasoning from its first character (the chat template opened the
    tag in the prompt; a ``start_tag`` the model writes anyway is dropped); otherwise only a response that starts
    with ``start_tag`` has reasoning. Reasoning that is never closed runs to the end of the response.
    """

    name: ClassVar[str]
    start_tag: ClassVar[str] = "<think>"
    end_tag: ClassVar[str] = "</think>"
    starts_in_reasoning: ClassVar[bool] = False

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def stream(self) -> ReasoningStream:
        """A new incremental splitter for one response."""
        return ReasoningStream(self.start_tag, self.end_tag, self.starts_in_reasoning)

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole response; None for a part that is empty or only whitespace."""
        stream = self.stream()
        pieces = [stream.feed(text), stream.finish()]
        reasoning, content = "".join(p[0] for p in pieces), "".join(p[1] for p in pieces)
        return reasoning if reasoning.strip() else None, content if content.strip() else None


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek R1 (and its distills, QwQ): its chat template ends the prompt with ``<think>``, so the response is
    reasoning up to ``</think>``, and all reasoning without one."""

    name: ClassVar[str] = "deepseek_r1"
    starts_in_reasoning: ClassVar[bool] = True


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: ``<think>...</think>`` at the start is reasoning; a response without ``<think>`` (thinking turned
    off) is all content. Qwen3 thinking-only releases whose template opens ``<think>`` in the prompt want
    ``deepseek_r1``."""

    name: ClassVar[str] = "qwen3"


BUILTIN_REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)}


REASONING_PARSERS = ParserRegistry("reasoning parser", ReasoningParser, BUILTIN_REASONING_PARSERS,
                                   "reasoning_parsers")
get_reasoning_parser, reasoning_parser_names = REASONING_PARSERS.get, REASONING_PARSERS.names
