"""Incremental detokenization never emits half a multi-byte character."""
from __future__ import annotations

from kvserve.conformance.tiny_model import build_tokenizer
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


def test_flush_gives_a_character_cut_short_by_the_last_token():
    tokenizer = build_tokenizer()
    ids = tokenizer(" ok 東京")["input_ids"]
    cut = next(i for i in range(len(ids), 0, -1) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    for token in ids[:cut]:
        detokenizer.add(token)
    assert not detokenizer.text.endswith("\ufffd")
    assert detokenizer.flush() and detokenizer.text == tokenizer.decode(ids[:cut])
