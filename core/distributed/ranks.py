"""Where ranks 1 to N - 1 run: processes that multiprocessing spawns on this machine (``mp``), or Ray actors
(``ray``) on the Ray instance ``ray.init`` finds (a cluster's, given ``RAY_ADDRESS``, else a new local one).
Either way rank 0 can wait for one to end and say which ended and how, and a rank runs kvserve's code only: the
script that built the engine is not run again in it."""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
import threading
import types
from contextlib import contextmanager

import torch

from kvserve.core.config import EngineConfig
from kvserve.core.distributed.worker import run_rank, world_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def share_of_threads(processes: int) -> int | None:
    """Torch threads for each of ``processes`` on this machine: processes that each took all of its threads would
    contend for its cores (several times slower on 2), so each takes its share, unless OMP_NUM_THREADS says."""
    return None if "OMP_NUM_THREADS" in os.environ else max(1, torch.get_num_threads() // processes)


_main_swap = threading.Lock()


@contextmanager
def main_module_left_behind():
    """While processes spawn, a bare module stands in for this one's ``__main__``, so that they do not run it again.

    A spawned process first runs its parent's main module again (as ``__mp_main__``, from the path in its
    ``__file__`` or by its module name) so that what the parent's script defines can be unpickled. A rank needs
    none of it: its target and arguments are kvserve's. Run again, a script on standard input (``python -``, whose
    ``__file__`` is ``'<stdin>'``) is a FileNotFoundError, and one without an ``if __name__ == "__main__":`` guard
    builds its engine again inside the rank; with the main module left behind, a rank starts as it does for
    ``python -c`` or a REPL (whose main module has neither path nor name), whatever started the engine."""
    with _main_swap:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if main is None:
                del sys.modules["__main__"]
            else:
                sys.modules["__main__"] = main


class ProcessRanks:
    address = "127.0.0.1"

    def __init__(self, config: EngineConfig, port: int):
        context = multiprocessing.get_context("spawn")
        self.threads = share_of_threads(world_size(config))
        self.processes = [context.Process(target=run_rank, args=(config, rank, self.address, port, self.threads),
                                          daemon=True,
                                          name=f"kvserve-rank-{rank}")
                          for rank in range(1, world_size(config))]
        with main_module_left_behind():
            for process in self.processes:
                process.start()
        self.pids = [process.pid for process in self.processes]
        self.sentinels = [process.sentinel for process in self.processes]
        self.reaping = threading.Lock()

    def wait(self, timeout: float | None = None) -> None:
        """Return once a rank has ended, or after ``timeout`` seconds."""
        multiprocessing.connection.wait(self.sentinels, timeout)

    def ended(self) -> str | None:
        """How the first rank that has ended did, if one has."""
        # One thread at a time: of two reaping a process at once, the loser's waitpid fails and it looks alive.
        with self.reaping:
            ended = multiprocessing.connection.wait(self.sentinels, 0)
            for rank, process in enumerate(self.processes, 1):
                if process.sentinel in ended:
                    process.join()
                    return f"rank {rank} (process {process.pid}) ended with exit code {process.exitcode}"
        return None

    def join(self) -> None:
        for process in self.processes:
            process.join()


class RankActor:
    """A rank's Ray actor: its process is Ray's, its work the spawned process's."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, config: EngineConfig, rank: int, address: str, port: int) -> None:
        run_rank(config, rank, address, port, None)


class RayRanks:
    threads = None   # no share of this machine's: Ray places the ranks

    def __init__(self, config: EngineConfig, port: int):
        try:
            import ray
        except ImportError:
            raise ValueError("distributed_executor_backend='ray' needs Ray: pip install ray") from None
        if not ray.is_initialized():
            ray.init()
        self.ray = ray
        self.address = ray.util.get_node_ip_address()
        # Placed by Ray, not counted against CPUs: each rank's threads are the platform's business.
        actors = [ray.remote(num_cpus=0)(RankActor).remote() for _ in range(1, world_size(config))]
        self.actors, self.pids = actors, ray.get([actor.pid.remote() for actor in actors])
        self.runs = [actor.run.remote(config, rank, self.address, port) for rank, actor in enumerate(actors, 1)]

    def wait(self, timeout: float | None = None) -> None:
        self.ray.wait(self.runs, num_returns=1, timeout=timeout)

    def ended(self) -> str | None:
        done, _ = self.ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        for rank, (run, pid) in enumerate(zip(self.runs, self.pids), 1):
            if run in done:
                try:
                    self.ray.get(run)
                    how = "returned"
                except Exception as exc:   # the actor died, or its rank raised
                    how = f"failed: {type(exc).__name__}"
                return f"rank {rank} (Ray actor, process {pid}) {how}"
        return None

    def join(self) -> None:
        self.ray.get(self.runs)
        for actor in self.actors:
            self.ray.kill(actor)


def start_ranks(config: EngineConfig, port: int) -> ProcessRanks | RayRanks:
    backend = config.parallel.distributed_executor_backend
    return (RayRanks if backend == "ray" else ProcessRanks)(config, port)
