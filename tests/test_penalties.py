"""Penalties, logit_bias and bad_words against the same rules applied by hand to transformers' logits."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from kvserve import LLM, SamplingParams

PROMPT_TEXT = "The quick brown fox jumps over the lazy dog. The quick brown fox"
STEPS = 40
# Every logit pushed below zero: greedy then shows which way a penalty moves negative logits.
ALL_NEGATIVE = {token: -50.0 for token in range(384)}


@pytest.fixture(scope="module")
def prompt(tiny_tokenizer):
    return tiny_tokenizer(PROMPT_TEXT)["input_ids"]


@pytest.fixture(scope="module")
def llm(qwen2_path):
    return LLM(qwen2_path, dtype="float32", kv_cache_memory="8MiB", max_model_len=256, max_num_seqs=16)


def greedy(**params) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, **params)


@torch.no_grad()
def reference_greedy(qwen2_hf, prompt: list[int], process) -> list[int]:
    """Greedy decoding of transformers' model, with ``process(logits, prompt, output)`` before each argmax."""
    output = []
    for _ in range(STEPS):
        logits = qwen2_hf(torch.tensor([prompt + output])).logits[0, -1].float()
        output.append(int(process(logits, prompt, output).argmax()))
    return output


def counts(output: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(output, dtype=torch.int64), minlength=vocab).float()


def by_hand(presence=0.0, frequency=0.0, repetition=1.0, bias=None):
    """vLLM's order: logit_bias, then the repetition, frequency and presence penalties."""
    def process(logits, prompt, output):
        for token, value in (bias or {}).items():
            logits[token] += value
        if repetition != 1.0:
            ids = torch.tensor([prompt + output])
            logits = RepetitionPenaltyLogitsProcessor(repetition)(ids, logits[None])[0]
        if output:
            seen = counts(output, logits.shape[-1])
            logits = logits - frequency * seen - presence * (seen > 0)
        return logits
    return process


CASES = [
    (dict(frequency_penalty=1.5), dict(frequency=1.5)),
    (dict(frequency_penalty=-0.7), dict(frequency=-0.7)),
    (dict(presence_penalty=1.2), dict(presence=1.2)),
    (dict(presence_penalty=-1.0), dict(presence=-1.0)),
    (dict(repetition_penalty=1.8), dict(repetition=1.8)),
    (dict(repetition_penalty=0.6), dict(repetition=0.6)),
    (dict(repetition_penalty=1.8, logit_bias=ALL_NEGATIVE), dict(repetition=1.8, bias=ALL_NEGATIVE)),
    (dict(repetition_penalty=0.6, logit_bias=ALL_NEGATIVE), dict(repetition=0.6, bias=ALL_NEGATIVE)),
    (dict(logit_bias={300: 4.0, 227: -3.0, 142: 2.5}), dict(bias={300: 4.0, 227: -3.0, 142: 2.5})),
    (dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.3, logit_bias={300: 3.0}),
     dict(repetition=1.3, frequency=0.4, presence=-0.3, bias={300: 3.0})),
]


def test_penalties_and_bias_match_transformers(llm, qwen2_hf, prompt):
    # One batch: every case beside a plain greedy request, which the others must not change.
    params = [greedy(**kwargs) for kwargs, _ in CASES] + [greedy()]
    outputs = [o.outputs[0].token_ids for o in llm.generate([prompt] * len(params), params, use_tqdm=False)]
    plain = reference_greedy(qwen2_hf, prompt, lambda logits, *_: logits)
    assert outputs[-1] == plain
    for (kwargs, rule), output in zip(CASES, outputs):
        expected = reference_greedy(qwen2_hf, prompt, by_hand(**rule))
        assert output == expected, kwargs
        assert expected != plain, f"{kwargs} changes nothing here: the case cannot fail"


@torch.no_grad()
def test_penalty_rows_match_transformers_processor(qwen2_hf, prompt):
    """apply_penalties on a batch of real logits rows equals transformers' processor and OpenAI's formula."""
    from kvserve.core.layers.logits_processors import apply_penalties, pad_ids
    logits = qwen2_hf(torch.tensor([prompt])).logits[0].float()    # one row per prefix of the prompt
    rows, vocab = len(prompt) - 1, logits.shape[-1]
    prompts = [prompt[:i + 1] for i in range(rows)]
    outputs = [prompt[i + 1:] for i in range(rows)]       # the rest of the prompt, as if generated
    repetition = torch.linspace(0.5, 2.0, rows)
    presence, frequency = torch.linspace(-2, 2, rows), torch.linspace(2, -2, rows)
    got = apply_penalties(logits[:rows], pad_ids(prompts, vocab, "cpu"), pad_ids(outputs, vocab, "cpu"),
                          presence, frequency, repetition)
    for i in range(rows):
        ids = torch.tensor([prompts[i] + outputs[i]])
        expected = RepetitionPenaltyLogitsProcessor(repetition[i].item())(ids, logits[i:i + 1].clone())[0]
        seen = counts(outputs[i], vocab) if outputs[i] else torch.zeros(vocab)
        expected = expected - frequency[i] * seen - presence[i] * (seen > 0)
        torch.testing.assert_close(got[i], expected)


def test_neutral_values_leave_greedy_unchanged(llm, prompt):
    plain = llm.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    neutral = greedy(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias={},
                     bad_words=[])
    assert llm.generate([prompt], neutral, use_tqdm=False)[0].outputs[0].token_ids == plain


def test_logit_bias_forces_and_forbids_tokens(llm, prompt):
    for params in (greedy(logit_bias={200: 100.0}), SamplingParams(temperature=1.5, seed=0, max_tokens=STEPS,
                                                                   ignore_eos=True, logit_bias={200: 100.0})):
        assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == [200] * STEPS
    plain = llm.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    banned = {token: -100.0 for token in plain}
    output = llm.generate([prompt], greedy(logit_bias=banned), use_tqdm=False)[0].outputs[0].token_ids
    assert not set(output) & set(plain)


def contains(sequence: list[int], part: list[int]) -> bool:
    return any(sequence[i:i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def test_bad_words_never_appear(llm, qwen2_hf, prompt, tiny_tokenizer):
    plain = llm.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0].token_ids

    def round_trips(ids: list[int]) -> bool:
        """The text of ``ids`` encodes back to them, and keeps its first character as a bad word (not blank)."""
        text = tiny_tokenizer.decode(ids)
        return text == text.lstrip() and tiny_tokenizer.encode(text, add_special_tokens=False) == ids

    def spellings(words: list[str]) -> list[list[int]]:
        """Each word's token ids at the start of a text and after a space, as vLLM tokenizes bad words."""
        return [tiny_tokenizer.encode(text, add_special_tokens=False)
                for w in words for text in (w.lstrip(), " " + w.lstrip())]

    # A one-token word from the greedy output, and a two-token word whose tokens it generates in a row.
    one = next([t] for t in reversed(plain) if round_trips([t]))
    pair = next(plain[i:i + 2] for i in range(len(plain) - 1) if round_trips(plain[i:i + 2]))
    words = [tiny_tokenizer.decode(one), tiny_tokenizer.decode(pair)]
    assert one in spellings(words[:1]) and pair in spellings(words[1:])
    # Each word alone changes the greedy output (the pair only right after its first token), then both together.
    for chosen in (words[:1], words[1:], words):
        banned = spellings(chosen)

        def ban(logits, prompt, output):
            for ids in banned:
                if len(ids) == 1 or output[len(output) - len(ids) + 1:] == ids[:-1]:
                    logits[ids[-1]] = float("-inf")
            return logits

        output = llm.generate([prompt], greedy(bad_words=chosen), use_tqdm=False)[0].outputs[0].token_ids
        assert output == reference_greedy(qwen2_hf, prompt, ban) != plain, chosen
        assert not any(contains(output, ids) for ids in banned)
    sampled = SamplingParams(temperature=2.0, seed=1, max_tokens=64, ignore_eos=True, bad_words=words)
    output = llm.generate([prompt], sampled, use_tqdm=False)[0].outputs[0].token_ids
    assert not any(contains(output, ids) for ids in spellings(words))
    assert not llm.llm_engine.runner.sampler.bad_words   # released with their requests


def test_seeded_sampling_with_penalties_reproducible(llm, prompt):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=STEPS, ignore_eos=True, presence_penalty=0.8,
                            frequency_penalty=0.5, repetition_penalty=1.4, logit_bias={7: 2.0}, bad_words=["the"])
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == alone
    others = [greedy(frequency_penalty=1.0), SamplingParams(temperature=1.0, max_tokens=8)]
    batch = llm.generate([prompt, prompt[:5], prompt[3:]], [params, *others], use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone
    unpenalized = SamplingParams(temperature=1.0, seed=5, max_tokens=STEPS, ignore_eos=True)
    assert llm.generate([prompt], unpenalized, use_tqdm=False)[0].outputs[0].token_ids != alone
