"""A constraint starts after the reasoning: on a tiny model whose tokenizer has <think> and </think> as single
tokens, the manager masks nothing while a sequence thinks, lets its first token open the reasoning where the
parser's must open with a tag, and masks by the grammar after the end tag; the engine does the same."""
from __future__ import annotations

import re

import pytest

from kvserve import LLM, SamplingParams, StructuredOutputsParams
from kvserve.conformance.tiny_model import build_tokenizer, save_tiny_model
from kvserve.core.config import StructuredOutputsConfig
from kvserve.core.engine.scheduler import ScheduledBatch
from kvserve.core.engine.sequence import Sequence
from kvserve.core.structured_outputs.manager import StructuredOutputManager

REGEX = "[a-e]{3,9}!"
VOCAB = 392   # the trained 384 tokens and the two tags


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory) -> str:
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)
    return save_tiny_model(str(tmp_path_factory.mktemp("thinking")), tokenizer=tokenizer, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tokenizer(thinking_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(thinking_model)


def allowed(manager: StructuredOutputManager, seq: Sequence) -> set[int] | None:
    """The tokens the step's bitmask lets ``seq`` sample next; None when it has no row (nothing is masked)."""
    grammar = manager.bitmask(ScheduledBatch([seq], [1], 1, [], [], []))
    if grammar is None:
        return None
    row = grammar.bits[grammar.rows[seq.seq_id]]
    return {t for t in range(manager.vocab_size) if (int(row[t // 32]) >> (t % 32)) & 1}


def started(manager: StructuredOutputManager, prompt: list[int]) -> Sequence:
    seq = Sequence("r", prompt, SamplingParams(), 512, [2])
    seq.num_computed_tokens = len(prompt) - 1
    params = StructuredOutputsParams(regex=REGEX)
    manager.compile(params)
    manager.add(seq.seq_id, params, prompt)
    return seq


def take(manager: StructuredOutputManager, seq: Sequence, token: int) -> bool:
    seq.token_ids.append(token)
    seq.num_computed_tokens += 1
    return manager.accept(seq.seq_id, token)


def test_a_sequence_thinks_unmasked_then_follows_its_grammar(tokenizer):
    think, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    letter_a, letter_z = tokenizer.convert_tokens_to_ids(["a", "z"])
    config = StructuredOutputsConfig(reasoning_parser="deepseek_r1")
    manager = StructuredOutputManager(config, tokenizer, VOCAB, [2])
    seq = started(manager, [5, 6, think])
    assert allowed(manager, seq) is None
    assert not take(manager, seq, letter_z) and allowed(manager, seq) is None
    assert not take(manager, seq, end)
    after = allowed(manager, seq)
    assert letter_a in after and letter_z not in after and end not in after
    closed = started(manager, [5, think, 6, end, 7])   # a template that opened and closed the reasoning
    assert allowed(manager, closed) == after


def test_a_qwen3_sequence_may_open_its_reasoning_with_its_first_token(tokenizer):
    think, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    letter_a, letter_z = tokenizer.convert_tokens_to_ids(["a", "z"])
    manager = StructuredOutputManager(StructuredOutputsConfig(reasoning_parser="qwen3"), tokenizer, VOCAB, [2])
    thinking, answering = started(manager, [5, 6]), started(manager, [5, 6])
    first = allowed(manager, thinking)
    assert {think, letter_a} <= first and letter_z not in first and end not in first
    take(manager, thinking, think)
    assert allowed(manager, thinking) is None
    take(manager, answering, letter_a)
    assert think not in allowed(manager, answering) and letter_a in allowed(manager, answering)


def test_without_single_token_tags_the_constraint_starts_at_once():
    tokenizer = build_tokenizer()   # "<think>" is several tokens
    manager = StructuredOutputManager(StructuredOutputsConfig(reasoning_parser="deepseek_r1"), tokenizer, 384, [2])
    assert manager.gate is None
    assert allowed(manager, started(manager, [5, 6])) is not None


@pytest.mark.parametrize("parser", [None, "deepseek_r1"])
def test_the_engine_starts_the_constraint_after_the_reasoning(thinking_model, tokenizer, parser):
    end = tokenizer.convert_tokens_to_ids("</think>")
    llm = LLM(thinking_model, dtype="float32", kv_cache_memory="16MiB", reasoning_parser=parser)
    # The bias makes the model end its reasoning at once wherever the grammar does not forbid it.
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=20, logit_bias={end: 100.0},
                            structured_outputs=StructuredOutputsParams(regex=REGEX))
    completion = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(REGEX, completion.text), completion.text   # the skipped special </think> aside
    assert (completion.token_ids[0] == end) == (parser is not None) and completion.token_ids.count(end) <= 1
