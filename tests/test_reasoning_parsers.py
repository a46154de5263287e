"""Reasoning parsers: deepseek_r1 and qwen3 split a response into reasoning and content, streamed the same as
whole, however the text is split."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.core.entrypoints.openai.reasoning_parsers import (ReasoningParser, get_reasoning_parser,
                                                               reasoning_parser_names)
from kvserve.plugins.manager import PluginManager


def parser(name: str) -> ReasoningParser:
    return get_reasoning_parser(name, PluginManager(discover=False))(None)


def streamed(name: str, pieces: list[str]) -> tuple[str | None, str | None]:
    stream = parser(name).stream()
    parts = [stream.feed(piece) for piece in pieces] + [stream.finish()]
    reasoning, content = "".join(p[0] for p in parts), "".join(p[1] for p in parts)
    return reasoning if reasoning.strip() else None, content if content.strip() else None


CASES = [
    ("deepseek_r1", "Let me think.\nOK.</think>\n\nThe answer is 4.", ("Let me think.\nOK.", "\n\nThe answer is 4.")),
    ("deepseek_r1", "<think>\nhmm</think>4", ("\nhmm", "4")),
    ("deepseek_r1", "  <think>a < b </thin k</think>", ("a < b </thin k", None)),
    ("deepseek_r1", "still thinking when cut off <", ("still thinking when cut off <", None)),
    ("deepseek_r1", "", (None, None)),
    ("qwen3", "<think>\nstep 1\n</think>\n\nDone.", ("\nstep 1\n", "\n\nDone.")),
    ("qwen3", "\n<think></think>Answer", (None, "Answer")),
    ("qwen3", "Thinking is off: no <think> here.</think>", (None, "Thinking is off: no <think> here.</think>")),
    ("qwen3", "<think>cut off mid-thought", ("cut off mid-thought", None)),
    ("qwen3", "<thi", (None, "<thi")),
]


@pytest.mark.parametrize("name,text,expected", CASES)
def test_reasoning_and_content_whole_and_in_every_split(name, text, expected):
    assert parser(name).extract(text) == expected
    ways = [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]
    for pieces in ways:
        assert streamed(name, pieces) == expected, pieces


def test_partial_tags_are_held_back_until_decided():
    stream = parser("qwen3").stream()
    assert stream.feed("<thi") == ("", "")
    assert stream.feed("nk>I reason</th") == ("I reason", "")
    assert stream.feed("ink>Hi") == ("", "Hi")
    assert stream.finish() == ("", "")
    stream = parser("deepseek_r1").stream()
    assert stream.feed("a </") == ("a ", "")
    assert stream.feed("b") == ("</b", "")


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
@settings(max_examples=100, deadline=None)
@given(text=st.lists(st.sampled_from(["<think>", "</think>", "<th", "</", "k>", " ", "\n", "a", "é🙂", "<", ">"]),
                     max_size=20).map("".join),
       cuts=st.sets(st.integers(1, 200), max_size=8))
def test_any_text_splits_the_same_however_fed(name, text, cuts):
    cuts = sorted(c for c in cuts if c < len(text))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    assert streamed(name, pieces) == streamed(name, list(text)) == parser(name).extract(text)


def test_unknown_reasoning_parser_lists_the_available_ones():
    plugins = PluginManager(discover=False)
    assert reasoning_parser_names(plugins) == ["deepseek_r1", "qwen3"]
    with pytest.raises(ValueError, match="unknown reasoning parser 'r1'; available: deepseek_r1, qwen3"):
        get_reasoning_parser("r1", plugins)
