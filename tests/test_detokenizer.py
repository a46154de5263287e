"""Incremental detokenization never emits half a multi-byte character."""
from __future__ import annotations

from conftest import build_tokenizer
from kvserve.core.engine.detokenizer import IncrementalDetokenizer


def test_deltas_join_to_full_text_without_broken_characters():
    tokenizer = build_tokenizer()
    prompt = tokenizer("Paged attention:")["input_ids"]
    text = " déjà vu 東京🙂, naïve café; 🙂🙂 ok"
    ids = tokenizer(text)["input_ids"]
    # Byte-level BPE splits the rare characters into single-byte tokens, so some tokens end mid-character.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    deltas = [detokenizer.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detokenizer.text == tokenizer.decode(ids)
