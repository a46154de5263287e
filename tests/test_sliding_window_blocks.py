"""With a sliding window over every layer, a sequence gives up the blocks before its window: the null block
takes their places, forks and swaps skip them, and a sequence far longer than the KV cache runs in it with
transformers' tokens. With a global layer beside the sliding ones, it gives up none."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvserve import LLM, SamplingParams
from kvserve.conformance.tiny_model import hf_greedy
from kvserve.core.engine.block_manager import BlockManager
from kvserve.core.engine.sequence import Sequence

BLOCK = 4


def computed_seq(manager: BlockManager, num_tokens: int) -> Sequence:
    seq = Sequence("r", list(range(100, 100 + num_tokens)), SamplingParams(max_tokens=64), 1024, [2])
    assert manager.allocate_slots(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    return seq


def test_blocks_before_the_window_are_given_up_once():
    manager = BlockManager(num_blocks=12, block_size=BLOCK, enable_prefix_caching=False, sliding_window=6)
    assert manager.num_free_blocks == manager.num_blocks == 11   # block 0 is the null block
    seq = computed_seq(manager, 17)        # positions 0-16; the next token, 17, attends to 12-17
    held = list(seq.block_table)
    manager.free_out_of_window(seq)
    assert seq.block_table == [0, 0, 0] + held[3:]
    assert manager.num_free_blocks == 11 - 5 + 3
    manager.free_out_of_window(seq)        # nothing more falls out
    assert manager.num_free_blocks == 9
    seq.num_computed_tokens = 21           # 21 attends to 16-21: block 3 (12-15) goes too
    manager.free_out_of_window(seq)
    assert seq.block_table == [0, 0, 0, 0] + held[4:] and manager.num_free_blocks == 10
    manager.free(seq)
    assert manager.num_free_blocks == 11


def test_forks_and_swaps_skip_the_given_up_blocks():
    manager = BlockManager(num_blocks=12, block_size=BLOCK, enable_prefix_caching=False, num_host_blocks=4,
                           sliding_window=6)
    parent = computed_seq(manager, 17)
    manager.free_out_of_window(parent)
    child = Sequence("r", list(parent.token_ids), SamplingParams(max_tokens=64), 1024, [2])
    manager.fork(parent, child)
    kept = parent.block_table[3:]
    assert [manager.ref_counts[b] for b in kept] == [2, 2] and manager.ref_counts[0] == 0
    manager.free(child)
    assert manager.swap_out(parent)
    assert parent.host_blocks[:3] == [None] * 3 and len(manager.swap_outs_this_step) == 2
    assert manager.num_free_blocks == 11 and len(manager.free_host_blocks) == 2
    host_blocks = parent.host_blocks[3:]
    assert manager.swap_in(parent, 1)
    assert parent.block_table[:3] == [0, 0, 0] and 0 not in parent.block_table[3:]
    assert manager.swap_ins_this_step == list(zip(host_blocks, parent.block_table[3:]))
    assert len(manager.free_host_blocks) == 4 and manager.num_free_blocks == 9


def test_sequences_longer_than_the_cache_run_in_their_window(tiny_model):
    """Mistral's window is 24 tokens: with blocks of 8 and steps of 16 tokens a sequence holds at most 56, and two
    sequences of 190 run in a cache of 64, one preempted while the other runs."""
    path = tiny_model("mistral-sliding")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [list(range(5, 45)), list(range(300, 340))]
    expected = hf_greedy(hf, prompts, 150)
    llm = LLM(path, dtype="float32", block_size=8, num_gpu_blocks_override=8, max_num_batched_tokens=16,
              max_model_len=256, max_num_seqs=2)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=150, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_a_global_layer_beside_sliding_ones_keeps_every_block(tiny_model):
    """Qwen2's use_sliding_window: its first layer attends to every position, its second to the last 24."""
    path = tiny_model("qwen2-sliding")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.config.layer_types == ["full_attention", "sliding_attention"]
    prompts = [list(range(5, 45)), list(range(300, 360))]
    expected = hf_greedy(hf, prompts, 60)
    llm = LLM(path, dtype="float32", block_size=8, max_num_batched_tokens=16, max_num_seqs=2)
    assert llm.llm_engine.block_manager.window is None
    assert [layer.sliding_window for layer in llm.llm_engine.runner.built.layers] == [None, 24]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
