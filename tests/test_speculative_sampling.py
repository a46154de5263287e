"""The verification rule of speculative decoding: greedy sequences keep the proposed tokens up to the first that
is not the target's argmax; sampled ones keep them by rejection sampling, so that every token is distributed as
the target samples it. Checked by chi-square against the target's distribution, on a small vocabulary with fixed
seeds, where a wrong rule (keeping every proposal, or resampling from the whole distribution) fails by far."""
from __future__ import annotations

from collections import Counter

import torch

from kvserve import LLM, SamplingParams
from kvserve.core.engine.sequence import Sequence
from kvserve.core.engine.speculation import verify
from kvserve.core.layers import ops
from kvserve.core.layers.sampler import SamplingBatch

# p-values of 1e-5 for chi-square statistics of 5 and 7 degrees of freedom
BOUND, BOUND_7 = 30.9, 35.3
NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


def batch_of(temperatures: list[float], generators: dict | None = None) -> SamplingBatch:
    rows = len(temperatures)
    return SamplingBatch(temperatures=torch.tensor(temperatures), top_k=torch.zeros(rows, dtype=torch.int64),
                         top_p=torch.ones(rows), min_p=torch.zeros(rows), all_greedy=max(temperatures) == 0,
                         use_top_k=False, use_top_p=False, use_min_p=False, generators=generators or {})


def speculating(proposal: list[int], temperature: float) -> Sequence:
    seq = Sequence("r", [1, 2, 3], SamplingParams(temperature=temperature), 100, [])
    seq.proposal = list(proposal)
    return seq


def test_greedy_sequences_keep_proposals_up_to_the_first_that_is_not_the_argmax():
    seqs = [speculating([5, 6, 7], 0), speculating([5, 9, 7], 0), speculating([4], 0)]
    targets = [5, 6, 7, 8] + [5, 6, 7, 8] + [3, 1]
    logits = torch.nn.functional.one_hot(torch.tensor(targets), 10).float()
    tokens, accepted, rows = verify(seqs, logits, batch_of([0.0] * len(targets)), ops.argmax)
    assert [(seqs.index(s), t) for s, t in tokens] == [(0, 5), (0, 6), (0, 7), (0, 8), (1, 5), (1, 6), (2, 3)]
    assert list(accepted.values()) == [3, 1, 0]
    assert rows == [0, 1, 2, 3, 4, 5, 8]   # the logits row that chose each kept token


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_tokens_are_distributed_as_the_target_samples_them():
    torch.manual_seed(0)
    # The target's distributions at the three rows of a two-token proposal [2, 4]: the first makes 2 fairly
    # likely, the second 4 unlikely, the third (after both) is the bonus token's.
    probs = torch.tensor([[0.10, 0.15, 0.40, 0.20, 0.10, 0.05],
                          [0.30, 0.25, 0.05, 0.10, 0.15, 0.15],
                          [0.05, 0.05, 0.30, 0.10, 0.20, 0.30]])
    num = 30000
    seqs = [speculating([2, 4], 1.0) for _ in range(num)]
    tokens, accepted, _ = verify(seqs, probs.log().repeat(num, 1), batch_of([1.0] * 3 * num), ops.argmax)
    emitted: dict[Sequence, list[int]] = {}
    for seq, token in tokens:
        emitted.setdefault(seq, []).append(token)
    assert all(len(emitted[s]) == accepted[s] + 1 for s in seqs)
    firsts = torch.bincount(torch.tensor([e[0] for e in emitted.values()]), minlength=6).float()
    assert chi_square(firsts, probs[0]) < BOUND
    seconds = torch.bincount(torch.tensor([e[1] for e in emitted.values() if len(e) > 1]), minlength=6).float()
    assert chi_square(seconds, probs[1]) < BOUND    # given the first proposal kept
    thirds = torch.bincount(torch.tensor([e[2] for e in emitted.values() if len(e) > 2]), minlength=6).float()
    assert chi_square(thirds, probs[2]) < BOUND     # the bonus token, given both kept
    assert sum(accepted.values()) > num * 0.4   # the first proposal is kept 40% of the time


def test_a_seeded_sequence_verifies_the_same_way_each_time():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))

    def run(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        tokens, _, _ = verify([speculating([7, 8], 1.0)], logits, batch_of([1.0] * 3, {0: generator, 1: generator,
                                                                                    2: generator}), ops.argmax)
        return [token for _, token in tokens]

    assert run(3) == run(3)
    assert len({tuple(run(seed)) for seed in range(20)}) > 1


def test_seeded_sampled_requests_speculate_and_repeat_their_outputs(tiny_model):
    prompts = [[5, 17, 42, 99, 3] * 6, [7, 8, 9] * 9, list(range(20, 44)) * 2]
    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=seed, max_tokens=30, ignore_eos=True)
              for seed in range(3)]
    runs = []
    for _ in range(2):
        llm = LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="16MiB", speculative_config=NGRAM)
        runs.append([out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)])
        assert llm.llm_engine.spec_verifications > 0
    assert runs[0] == runs[1]


def sample_many(path: str, prompt: list[int], num: int, proposal: list[int]):
    """How often each three-token output comes, over ``num`` seeds, each sequence given ``proposal`` (as a
    drafter would) at its first decode."""
    engine = LLM(path, dtype="float32", kv_cache_memory="16MiB", max_num_seqs=256).llm_engine
    for seed in range(num):
        engine.add_request(str(seed), prompt, SamplingParams(temperature=1.0, top_k=2, seed=seed, max_tokens=3,
                                                             ignore_eos=True))
    outputs = Counter()
    while engine.has_unfinished_requests():
        for seq in engine.scheduler.running:
            if seq.num_output_tokens == 1 and seq.num_uncomputed_tokens == 1:
                seq.proposal = list(proposal)
        outputs.update(tuple(out.outputs[0].token_ids) for out in engine.step() if out.finished)
    return outputs, engine


def test_the_engine_samples_as_the_target_does_when_verifying(tiny_model):
    path, prompt, num = tiny_model("llama-tied-gqa"), list(range(30, 50)), 2000
    plain, _ = sample_many(path, prompt, num, [])
    likely_second = Counter(output[1] for output in plain.elements()).most_common(1)[0][0]
    speculated, engine = sample_many(path, prompt, num, [likely_second])
    assert engine.spec_verifications == num and 0 < engine.spec_accepted_tokens < num
    cells = set(plain) | set(speculated)
    assert len(cells) <= 8   # top_k=2, three tokens
    statistic = sum((plain[c] - speculated[c]) ** 2 / (plain[c] + speculated[c]) for c in cells)
    assert statistic < BOUND_7
