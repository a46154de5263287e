"""Grammar backends: xgrammar and llguidance compile a constraint once, then give each sequence a matcher that
fills its row of a token bitmask (int32 words, bit t % 32 of word t // 32 set where token t is allowed) and
advances on the tokens it accepts."""
from __future__ import annotations

import re
from typing import Any, Protocol

import torch

from kvserve.core.structured_outputs.params import StructuredOutputsParams

BACKENDS = ("auto", "xgrammar", "guidance")
# xgrammar's JSON without free whitespace, in llguidance's terms, so that both backends write the same JSON
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Matcher(Protocol):
    """One sequence's position in its grammar."""

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Set ``bitmask[row]`` to the tokens allowed next."""

    def accept(self, token: int) -> bool:
        """Advance by ``token``; False if the grammar does not allow it."""

    def is_terminated(self) -> bool:
        """Whether the output is complete (a stop token was accepted after a whole match)."""

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens``, from the first, the grammar allows next (the matcher does not move)."""

    def rollback(self, count: int) -> None:
        """Undo the last ``count`` accepted tokens."""


class Backend(Protocol):
    name: str

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled constraint; a ValueError that names what is wrong if it cannot be compiled."""

    def matcher(self, compiled: Any) -> Matcher:
        """A matcher at the start of ``compiled``."""


def choice_regex(choices: list[str]) -> str:
    # re.escape also escapes spaces and other characters that the backends' regex dialects do not take escaped.
    return "(" + "|".join(re.sub(r"([.^$*+?{}\[\]\\|()])", r"\\\1", c) for c in choices) + ")"


class XgrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, params: StructuredOutputsParams) -> Any:
        kind, spec = params.kind, params.spec
        try:
            if kind == "json":
                # Compact JSON: a small model left free to add whitespace may emit it forever.
                return self.compiler.compile_json_schema(spec, any_whitespace=False)
            if kind == "json_object":
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return self.compiler.compile_regex(spec)
            if kind == "choice":
                return self.compiler.compile_regex(choice_regex(params.choice))
            return self.compiler.compile_grammar(spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"structured_outputs.{kind} cannot be compiled by xgrammar: {_first_line(exc)}") from None

    def matcher(self, compiled: Any) -> Matcher:
        return XgrammarMatcher(self.xgr.GrammarMatcher(compiled))


class XgrammarMatcher:
    def __init__(self, matcher):
        self.inner = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.inner.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return self.inner.accept_token(token)

    def is_terminated(self) -> bool:
        return self.inner.is_terminated()

    def valid_prefix(self, tokens: list[int]) -> int:
        count = 0
        while count < len(tokens) and self.inner.accept_token(tokens[count]):
            count += 1
        self.rollback(count)
        return count

    def rollback(self, count: int) -> None:
        if count:
            self.inner.rollback(count)


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stop_token_ids)

    def compile(self, params: StructuredOutputsParams) -> Any:
        kind = params.kind
        try:
            grammar = self._grammar(params)
            failed, messages = self.llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
            error = " ".join(" ".join(messages).split()) if failed else ""
        except (RuntimeError, ValueError, TypeError) as exc:
            error = _first_line(exc)
        if error:
            raise ValueError(f"structured_outputs.{kind} cannot be compiled by llguidance: {error}")
        return grammar

    def _grammar(self, params: StructuredOutputsParams) -> str:
        kind, spec = params.kind, params.spec
        if kind in ("json", "json_object"):
            schema = spec if kind == "json" else '{"type": "object"}'
            return self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)
        if kind in ("regex", "choice"):
            return self.llg.grammar_from("regex", spec if kind == "regex" else choice_regex(params.choice))
        return self.llg.grammar_from("grammar", spec)

    def matcher(self, compiled: Any) -> Matcher:
        return GuidanceMatcher(self.llg, self.llg.LLMatcher(self.tokenizer, compiled))


class GuidanceMatcher:
    def __init__(self, llg, matcher):
        self.fill_bitmask, self.inner = llg.torch.fill_next_token_bitmask, matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.fill_bitmask(self.inner, bitmask, row)

    def accept(self, token: int) -> bool:
        return self.inner.consume_token(token) and not self.inner.is_error()

    def is_terminated(self) -> bool:
        return self.inner.is_stopped()

    def valid_prefix(self, tokens: list[int]) -> int:
        return self.inner.validate_tokens(tokens)

    def rollback(self, count: int) -> None:
        if count:
            self.inner.rollback(count)


def _first_line(exc: Exception) -> str:
    """The message of a backend's error, without the source location xgrammar starts it with."""
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip()) or type(exc).__name__
    return text.splitlines()[0][:500]
