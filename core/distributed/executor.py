"""Tensor parallelism on one machine: the engine's process is rank 0 and starts a process for every other rank;
each builds its shard of the model and of the KV cache and runs every step rank 0 runs, so that their
collectives meet. Rank 0 sends each call on its model runner (a request's arrival or release, a scheduled step)
to the others through torch.distributed before making it itself; only its own step outputs are used (the
others compute the same logits, gathered over the ranks, and drop what they sample)."""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import socket
import threading
from datetime import timedelta

import torch.distributed as dist

from kvserve.core.config import EngineConfig
from kvserve.core.distributed.parallel_state import TensorParallel, set_tensor_parallel
from kvserve.core.engine.model_runner import ModelRunner
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.log import logger
from kvserve.core.models.registry import resolve_model_class
from kvserve.plugins.manager import Platform, PluginManager

# How long a collective waits for the other ranks (loading a large shard included) before it fails.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
WORKER_EXIT_WAIT_S = 2.0   # after a collective fails, how long a rank's process may take to be seen ended


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(config: EngineConfig, platform: Platform, rank: int, port: int) -> None:
    size = config.parallel.tensor_parallel_size
    dist.init_process_group(platform.info.dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=COLLECTIVE_TIMEOUT)
    set_tensor_parallel(TensorParallel(rank, size, platform.communicator(rank, size),
                                       config.parallel.enable_expert_parallel))


def _worker(config: EngineConfig, rank: int, size: int, port: int) -> None:
    plugins = PluginManager()
    platform = plugins.select_platform(config.device.device)
    _join(config, platform, rank, port)
    platform.seed(config.model.seed)
    checkpoint = Checkpoint.open(config.model.model)
    runner = ModelRunner(config, platform, checkpoint, resolve_model_class(checkpoint.hf_config, plugins.models()))
    while True:
        call = [None]
        dist.broadcast_object_list(call, src=0)
        name, args = call[0]
        if name == "stop":
            break
        getattr(runner, name)(*args)
    dist.destroy_process_group()


class TensorParallelFailure(RuntimeError):
    """A rank's process ended, or a call failed on rank 0 and left the ranks out of step: the engine stops."""


def _log_layout(hf_config, size: int, backend: str) -> None:
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    logger.info("tensor parallelism over %d ranks (%s, a process each): rank r holds query heads "
                "[r*%d, (r+1)*%d), %s, columns [r*%d, (r+1)*%d) of the MLPs and rows [r*%d, (r+1)*%d) of the "
                "vocabulary", size, backend, *[hf_config.num_attention_heads // size] * 2,
                f"key-value heads [r*{kv_heads // size}, (r+1)*{kv_heads // size})" if kv_heads >= size
                else f"a copy of key-value head r*{kv_heads}//{size}",
                *[hf_config.intermediate_size // size] * 2, *[-(-hf_config.vocab_size // size)] * 2)


class TensorParallelRunner:
    """Rank 0's model runner, as the engine uses it; every call it takes goes to the other ranks first. A thread
    watches the other ranks' processes: once one has ended, ``failure`` says which, and every call raises it."""

    active: TensorParallelRunner | None = None   # a process joins one group at a time

    def __init__(self, config: EngineConfig, platform: Platform, checkpoint: Checkpoint, model_cls: type):
        if TensorParallelRunner.active is not None:
            TensorParallelRunner.active.shutdown()
        size, port = config.parallel.tensor_parallel_size, _free_port()
        context = multiprocessing.get_context("spawn")
        self.workers = [context.Process(target=_worker, args=(config, rank, size, port), daemon=True,
                                        name=f"kvserve-tp-rank-{rank}") for rank in range(1, size)]
        for worker in self.workers:
            worker.start()
        self.failure: TensorParallelFailure | None = None
        self.stopping = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="kvserve-tp-watch").start()
        _join(config, platform, 0, port)
        self.runner = ModelRunner(config, platform, checkpoint, model_cls)
        TensorParallelRunner.active = self
        _log_layout(checkpoint.hf_config, size, platform.info.dist_backend)

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
            for worker in self.workers:
                worker.join()
        dist.destroy_process_group()
        set_tensor_parallel(TensorParallel())
        TensorParallelRunner.active = None

    def _call(self, name: str, args: tuple):
        if self.failure is not None:
            raise self.failure
        try:
            self._send(name, args)
            return getattr(self.runner, name)(*args)
        except Exception as exc:   # a collective broke as a rank's process ended, or rank 0 alone failed
            for worker in self.workers:
                worker.join(timeout=WORKER_EXIT_WAIT_S)
            self._note_failure()
            if self.failure is None:
                self.failure = TensorParallelFailure(
                    f"a tensor-parallel {name} failed on rank 0 ({type(exc).__name__}: {exc}); the other ranks are "
                    f"out of step with it, so the engine stops")
            raise self.failure from exc

    def _watch(self) -> None:
        ended = multiprocessing.connection.wait([worker.sentinel for worker in self.workers])
        for worker in self.workers:   # its pipe closes a moment before the process can be reaped
            if worker.sentinel in ended:
                worker.join(timeout=WORKER_EXIT_WAIT_S)
        if not self.stopping.is_set():
            self._note_failure()

    def _note_failure(self) -> None:
        dead = [(rank, worker) for rank, worker in enumerate(self.workers, 1) if not worker.is_alive()]
        if dead and self.failure is None:
            rank, worker = dead[0]
            self.failure = TensorParallelFailure(f"tensor-parallel rank {rank} (process {worker.pid}) ended with exit "
                                                 f"code {worker.exitcode}; the engine cannot run without its shard")
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
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
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
