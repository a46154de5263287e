"""Tensor parallelism: the engine's process is rank 0 and starts every other rank (ranks.py); each builds its
shard of the model and of the KV cache and runs every step rank 0 runs, so that their collectives meet. Rank 0
sends each call on its model runner (a request's arrival or release, a scheduled step) to the others through
torch.distributed before making it itself; only its own step outputs are used (the others compute the same
logits, gathered over the ranks, and drop what they sample)."""
from __future__ import annotations

import threading

import torch.distributed as dist

from kvserve.core.config import EngineConfig
from kvserve.core.distributed.parallel_state import TensorParallel, set_tensor_parallel
from kvserve.core.distributed.ranks import free_port, start_ranks
from kvserve.core.distributed.worker import join_group
from kvserve.core.engine.model_runner import ModelRunner
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.log import logger
from kvserve.plugins.manager import Platform

RANK_END_WAIT_S = 2.0   # after a collective fails, how long a rank that is ending may take to be seen ended


class TensorParallelFailure(RuntimeError):
    """A rank's process ended, or a call failed on rank 0 and left the ranks out of step: the engine stops."""


def _kv_heads(hf_config) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def _log_layout(hf_config, size: int, backend: str) -> None:
    kv_heads = _kv_heads(hf_config)
    logger.info("tensor parallelism over %d ranks (%s): rank r holds query heads "
                "[r*%d, (r+1)*%d), %s, columns [r*%d, (r+1)*%d) of the MLPs and rows [r*%d, (r+1)*%d) of the "
                "vocabulary", size, backend, *[hf_config.num_attention_heads // size] * 2,
                f"key-value heads [r*{kv_heads // size}, (r+1)*{kv_heads // size})" if kv_heads >= size
                else f"a copy of key-value head r*{kv_heads}//{size}",
                *[hf_config.intermediate_size // size] * 2, *[-(-hf_config.vocab_size // size)] * 2)


def leave_tensor_parallel_group() -> None:
    """Stop an earlier engine's ranks in this process, so that the next engine's layers are its own."""
    if TensorParallelRunner.active is not None:
        TensorParallelRunner.active.shutdown()


class TensorParallelRunner:
    """Rank 0's model runner, as the engine uses it; every call it takes goes to the other ranks first. A thread
    watches the other ranks' processes: once one has ended, ``failure`` says which, and every call raises it."""

    active: TensorParallelRunner | None = None   # a process joins one group at a time

    def __init__(self, config: EngineConfig, platform: Platform, checkpoint: Checkpoint, model_cls: type):
        port = free_port()
        self.ranks = start_ranks(config, port)
        self.failure: TensorParallelFailure | None = None
        self.stopping = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="kvserve-tp-watch").start()
        try:
            join_group(config, platform, 0, self.ranks.address, port, lambda: self.failure is None)
        except RuntimeError as exc:
            raise (self.failure or exc) from exc
        self.runner = ModelRunner(config, platform, checkpoint, model_cls)
        TensorParallelRunner.active = self
        _log_layout(checkpoint.hf_config, config.parallel.tensor_parallel_size, platform.info.dist_backend)

    def __getattr__(self, name: str):   # what the engine reads of its runner: num_blocks, vocab_size, ...
        if "runner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["runner"], name)

    def add(self, *args) -> None:
        self._call("add", args)

    def release(self, *args) -> None:
        if self.failure is None:
            self._call("release", args)
        else:   # the engine forgets the request; no rank is left to tell
            self.runner.release(*args)

    def execute(self, batch):
        return self._call("execute", (batch,))

    def shutdown(self) -> None:
        """Stop the other ranks and leave the group."""
        self.stopping.set()
        if self.failure is None:
            self._send("stop", ())
            self.ranks.join()
        dist.destroy_process_group()
        set_tensor_parallel(TensorParallel())
        TensorParallelRunner.active = None

    def _call(self, name: str, args: tuple):
        if self.failure is not None:
            raise self.failure
        try:
            self._send(name, args)
            return getattr(self.runner, name)(*args)
        except Exception as exc:   # a collective broke as a rank ended, or rank 0 alone failed
            self.ranks.wait(RANK_END_WAIT_S)
            self._note_failure()
            if self.failure is None:
                self.failure = TensorParallelFailure(
                    f"a tensor-parallel {name} failed on rank 0 ({type(exc).__name__}: {exc}); the other ranks are "
                    f"out of step with it, so the engine stops")
            raise self.failure from exc

    def _watch(self) -> None:
        self.ranks.wait()
        if not self.stopping.is_set():
            self._note_failure()

    def _note_failure(self) -> None:
        ended = self.ranks.ended()
        if ended is not None and self.failure is None:
            self.failure = TensorParallelFailure(f"{ended}; the engine cannot run without its shard")
            logger.error("%s", self.failure)

    @staticmethod
    def _send(name: str, args: tuple) -> None:
        dist.broadcast_object_list([(name, args)], src=0)


def check_tensor_parallel(config: EngineConfig, checkpoint: Checkpoint) -> None:
    """A clear error, before any process starts, where the model cannot be split over the ranks or a feature
    does not run split yet."""
    size, hf_config, path = config.parallel.tensor_parallel_size, checkpoint.hf_config, checkpoint.path
    what = f"tensor_parallel_size={size}"
    if checkpoint.own_quantization is not None or config.model.quantization == "gguf":
        raise ValueError(f"{what}: quantized checkpoints ({config.model.quantization}) do not split over ranks "
                         f"yet; use 1, or online quantization (None, 'int8', 'int4', 'fp8' on an unquantized model)")
    if config.speculation is not None and config.speculation.method != "ngram":
        raise ValueError(f"{what}: speculative method {config.speculation.method!r} does not split over ranks yet; "
                         f"use 1, or method 'ngram'")
    heads, kv_heads = hf_config.num_attention_heads, _kv_heads(hf_config)
    experts = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None)
    # What the ranks split evenly: the query heads, the dense MLPs' columns, and the experts or their columns.
    counts = {"query heads": heads}
    expert_size = getattr(hf_config, "moe_intermediate_size", None)
    if experts and expert_size is None:   # Mixtral: every MLP is its experts
        expert_size = hf_config.intermediate_size
    else:
        counts["intermediate size"] = hf_config.intermediate_size
    if getattr(hf_config, "shared_expert_intermediate_size", None):
        counts["shared expert intermediate size"] = hf_config.shared_expert_intermediate_size
    if experts:
        counts.update({"experts": experts} if config.parallel.enable_expert_parallel
                      else {"expert intermediate size": expert_size})

    def fits(n: int) -> bool:
        return all(count % n == 0 for count in counts.values()) and (kv_heads % n == 0 or n % kv_heads == 0)

    if not fits(size):
        sizes = ", ".join(str(n) for n in range(1, heads + 1) if fits(n))
        described = ", ".join(f"{count} {name}" for name, count in counts.items())
        raise ValueError(f"{what} cannot split {path!r} ({described}, {kv_heads} key-value heads): the size must "
                         f"divide each of those and divide or be a multiple of the key-value heads; sizes that "
                         f"fit: {sizes}")
