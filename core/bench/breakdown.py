"""`kvserve bench throughput --breakdown`: where a run's time went (prefill steps, decode steps, the rest), each
step's time against its roofline bound on this machine's matmul and memory-read rates, measured in the same run."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from kvserve.core.engine.model_runner import ModelRunner, step_layout
from kvserve.core.layers.linear import Linear
from kvserve.core.layers.moe import SparseMoe


def machine_rates(dtype: torch.dtype) -> dict:
    """This process's matmul rate in ``dtype`` (2048^3, as torch's oneDNN runs it) and memory-read rate (a float32
    dot product of two 512 MiB halves: a bfloat16 sum runs below the read rate on 2 cores), each the best of a few
    tries."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    matmul = max(2 * 2048 ** 3 / _seconds(lambda: a @ b) for _ in range(5))
    first, second = torch.ones(1 << 28).chunk(2)
    read = max(2 * first.nbytes / _seconds(lambda: torch.dot(first, second)) for _ in range(5))
    return {"matmul_tflop_s": round(matmul / 1e12, 3), "read_gb_s": round(read / 1e9, 2)}


def _seconds(work) -> float:
    work()
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


@dataclass
class CostModel:
    """A step's floating-point operations and bytes read, from the model's layers."""

    body_macs: int          # multiply-adds per token in the linear layers before the output projection
    head_macs: int          # per logits row
    weight_bytes: int       # every weight as loaded, read once a step
    kv_bytes_per_token: float   # all layers' keys and values of one position
    attention_macs: dict    # sliding window (None: none) -> sum over its layers of heads x head size

    @classmethod
    def of(cls, runner: ModelRunner) -> CostModel:
        model = runner.model
        if any(isinstance(m, SparseMoe) for m in model.modules()):
            raise ValueError("--breakdown's cost model counts dense layers; this is a mixture-of-experts model")
        head = getattr(model, "lm_head", None)
        linear = [m for m in model.modules() if isinstance(m, Linear) and m is not head]
        attention = {}
        for layer in runner.built.layers:
            window = layer.sliding_window
            attention[window] = attention.get(window, 0) + layer.num_heads * layer.head_size
        block_size = runner.config.cache.block_size
        return cls(sum(m.in_features * m.out_features for m in linear),
                   0 if head is None else head.in_features * head.out_features, runner.built.weight_bytes,
                   runner.kv_cache_bytes / (runner.num_blocks * block_size), attention)

    def step(self, batch) -> tuple[float, float]:
        """(operations, bytes) of ``batch``: every weight and its sequences' cached keys and values read once."""
        layout = step_layout(batch)
        query_lens, seq_lens = np.asarray(layout.query_lens), np.asarray(layout.seq_lens)
        rows = sum(s.num_computed_tokens + n == s.num_tokens + len(s.proposal)
                   for s, n in zip(batch.seqs, batch.num_new_tokens))
        # Query i of a sequence's chunk of q sees seq_len - q + i + 1 positions (its window's, at most).
        positions = np.repeat(seq_lens - query_lens, query_lens) + _within(query_lens) + 1
        pairs = sum(macs * (positions if window is None else np.minimum(positions, window)).sum()
                    for window, macs in self.attention_macs.items())
        flops = 2 * (self.body_macs * int(query_lens.sum()) + self.head_macs * rows + 2 * pairs)
        return float(flops), self.weight_bytes + self.kv_bytes_per_token * float(seq_lens.sum())


def _within(query_lens: np.ndarray) -> np.ndarray:
    """0, 1, ..., q - 1 for each query length q, concatenated."""
    starts = np.repeat(np.cumsum(query_lens) - query_lens, query_lens)
    return np.arange(int(query_lens.sum())) - starts


class TimedRunner:
    """A ModelRunner that times each step it runs; everything else is the runner's own."""

    def __init__(self, runner: ModelRunner):
        self.runner, self.cost = runner, CostModel.of(runner)
        self.steps: list[tuple[bool, float, float, float]] = []   # (has prompt tokens, seconds, flops, bytes)

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def submit(self, batch) -> None:
        flops, read = self.cost.step(batch)
        start = time.perf_counter()
        self.runner.submit(batch)
        self.steps.append((batch.num_decodes < len(batch.seqs), time.perf_counter() - start, flops, read))


def time_steps(engine) -> TimedRunner:
    """Time the steps of ``engine``, one LLMEngine whose ModelRunner runs in this process, from now on."""
    engine.runner = TimedRunner(engine.runner)
    return engine.runner


def breakdown(timed: TimedRunner, elapsed: float, rates: dict) -> dict:
    """Seconds in prefill steps (those with prompt tokens), in decode steps and elsewhere (scheduling, output
    processing), and each kind of step's roofline bound: per step, the longer of its operations at the matmul
    rate and its bytes at the read rate."""
    flop_s, byte_s = rates["matmul_tflop_s"] * 1e12, rates["read_gb_s"] * 1e9
    result = dict(rates)
    for kind, prefill in (("prefill", True), ("decode", False)):
        steps = [(s, max(f / flop_s, b / byte_s)) for p, s, f, b in timed.steps if p == prefill]
        seconds, bound = sum(s for s, _ in steps), sum(b for _, b in steps)
        result |= {f"{kind}_steps": len(steps), f"{kind}_s": _figure(seconds), f"{kind}_bound_s": _figure(bound),
                   f"{kind}_of_bound": _figure(bound / seconds) if seconds else None}
    other = elapsed - sum(s for _, s, _, _ in timed.steps)
    return result | {"other_s": _figure(other), "other_of_elapsed": _figure(other / elapsed)}


def _figure(value: float) -> float:
    return float(f"{value:.4g}")
