"""Speculative decoding's draft_model method: a smaller model (or the target itself, whose proposals all hold)
proposes tokens with its own paged KV cache under the target's block ids. Greedy outputs must be those without
speculation through continuous batching, chunked prefill, the prefix cache, forks and preemption."""
from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams

PROMPTS = [[5, 17, 42, 99, 3] * 6, [7, 8, 9] * 9 + [11], list(range(20, 44)) * 2, list(range(100, 140))]


def draft_config(path: str, k: int = 3) -> dict:
    return {"method": "draft_model", "model": path, "num_speculative_tokens": k}


def generate(path: str, speculative_config: dict | None, prompts, params, **options):
    llm = LLM(path, speculative_config=speculative_config,
              **{"dtype": "float32", "kv_cache_memory": "16MiB", "max_num_seqs": 8, **options})
    outputs = [[o.token_ids for o in out.outputs] for out in llm.generate(prompts, params, use_tqdm=False)]
    return outputs, llm.llm_engine


@pytest.mark.parametrize("draft", ["itself", "llama-draft"])
@pytest.mark.parametrize("chunk", [None, 12], ids=["whole-prompts", "chunks-of-12"])
def test_greedy_outputs_are_those_without_speculation(tiny_model, draft, chunk):
    path = tiny_model("llama-tied-gqa")
    config = draft_config(path if draft == "itself" else tiny_model(draft))
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    # Beside them: two greedy samples of one prompt (forked after its prefill), and a penalized request.
    params = [greedy] * 4 + [SamplingParams(n=2, temperature=0, max_tokens=30, ignore_eos=True),
                             SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=30, ignore_eos=True)]
    prompts = PROMPTS + PROMPTS[:2]
    plain, _ = generate(path, None, prompts, params, max_num_batched_tokens=chunk, max_model_len=256)
    for _ in range(2):   # the second time from the prefix cache
        speculated, engine = generate(path, config, prompts, params, max_num_batched_tokens=chunk, max_model_len=256)
        assert speculated == plain
    proposed, accepted = engine.spec_proposed_tokens, engine.spec_accepted_tokens
    if draft == "itself":   # the target's own greedy tokens: all hold
        assert accepted == proposed > 100
    else:
        assert proposed > accepted
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_preempted_sequences_draft_again(tiny_model):
    path = tiny_model("llama-tied-gqa")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain, _ = generate(path, None, PROMPTS, params)
    speculated, engine = generate(path, draft_config(path), PROMPTS, params, num_gpu_blocks_override=8,
                                  max_model_len=128)
    assert speculated == plain
    assert engine.scheduler.num_preemptions > 0 and engine.spec_accepted_tokens == engine.spec_proposed_tokens > 0


def test_rejected_proposals_leave_no_draft_entries_behind(tiny_model):
    engine = LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="16MiB", max_model_len=256,
                 speculative_config=draft_config(tiny_model("llama-draft"))).llm_engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    drafted = 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            # The draft's entries past the accepted tokens came from rejected ones: they must be recomputed.
            assert seq.draft_computed <= seq.num_computed_tokens
            drafted = max(drafted, seq.draft_computed)
    assert drafted > max(map(len, PROMPTS)) and engine.spec_proposed_tokens > engine.spec_accepted_tokens


def test_the_draft_cache_shares_the_memory_budget(tiny_model):
    path, draft = tiny_model("llama-tied-gqa"), tiny_model("llama-draft")
    options = dict(dtype="float32", kv_cache_memory="16MiB", max_model_len=256)
    alone = LLM(path, **options).llm_engine.runner
    runner = LLM(path, speculative_config=draft_config(draft), **options).llm_engine.runner
    # A block: 2 layers x 2 kv heads x 16 dims for the target, 1 layer x 1 kv head x 16 dims for the draft.
    assert runner.num_blocks == alone.num_blocks * 4 // 5
    cache = runner.drafter.kv_cache
    assert cache.numel() * cache.element_size() == runner.num_blocks * runner.drafter.block_bytes


def test_seeded_sampled_requests_draft_and_repeat_their_outputs(tiny_model):
    path = tiny_model("llama-tied-gqa")
    params = [SamplingParams(temperature=0.8, seed=seed, max_tokens=30, ignore_eos=True) for seed in range(4)]
    runs = [generate(path, draft_config(path), PROMPTS, params) for _ in range(2)]
    assert runs[0][0] == runs[1][0]
    assert 0 < runs[0][1].spec_accepted_tokens < runs[0][1].spec_proposed_tokens


def test_smollm2_drafting_for_itself_on_its_quantized_blocks(smollm2_path):
    prompt = "Write a short story about a robot who learns to paint."
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    options = dict(dtype="auto", kv_cache_memory="64MiB", max_model_len=512)
    plain, _ = generate(smollm2_path, None, [prompt], params, **options)
    # The draft runs the GGUF file's 4-bit blocks on the quantized kernels; the target, its dequantized weights.
    config = {**draft_config(smollm2_path, 4), "quantization": "gguf"}
    speculated, engine = generate(smollm2_path, config, [prompt], params, **options)
    assert speculated == plain
    kernel = engine.runner.drafter.model.model.layers[0].mlp.down_proj.kernel
    assert kernel.__qualname__.startswith("grouped_linear")   # the CPU platform's 4-bit kernel
    assert engine.spec_accepted_tokens > 0.8 * engine.spec_proposed_tokens


@pytest.mark.parametrize("draft, options, words", [
    ("qwen2-big-vocab", {}, "has a vocabulary of 30000 tokens, the target 384: a draft model must share"),
    ("llama-draft", {}, "takes 256 positions, fewer than max_model_len=512"),
])
def test_unfit_draft_models_are_clear_errors(tiny_model, draft, options, words):
    with pytest.raises(ValueError, match=words):
        LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="16MiB",
            speculative_config=draft_config(tiny_model(draft)), **options)
