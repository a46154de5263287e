"""A data-parallel engine's replicas: each a whole LLMEngine in a spawned process of its own, which takes the
front's commands (add, abort, stop) from a pipe and sends back every step's outputs with its engine's stats. In
the front, a thread reads the pipes and notes a replica whose process ends."""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field, replace

import torch

from kvserve.core.config import EngineConfig
from kvserve.core.distributed.executor import leave_parallel_group
from kvserve.core.distributed.ranks import main_module_left_behind, share_of_threads
from kvserve.core.engine.llm_engine import EngineStepError, LLMEngine
from kvserve.core.engine.stats import EngineStats
from kvserve.core.log import init_logging, logger

IDLE_POLL_S = 0.5         # how often an idle replica looks whether a tensor-parallel rank of its own has ended
STOP_WAIT_S = 10.0        # how long a replica told to stop may take to end its step and exit


class DataParallelFailure(RuntimeError):
    """A replica's process ended, or its engine stopped: the engine stops, as one whose tensor-parallel rank ended
    does."""


@dataclass
class Replica:
    index: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    info: dict | None = None          # what it reported once ready
    stats: EngineStats = field(default_factory=EngineStats)   # as of its last report
    stopped: bool = False             # told to stop: its end is no failure


class Replicas:
    """The replicas' processes and pipes, and a thread that reads the pipes: their outputs wait in ``inbox``
    for the front; a replica whose process ends (or that reports what stopped its engine) is ``failure``."""

    def __init__(self, config: EngineConfig):
        size = config.parallel.data_parallel_size
        self.threads = share_of_threads(size)   # 8x slower on 2 cores when each took all
        context = multiprocessing.get_context("spawn")
        self.replicas: list[Replica] = []
        for index in range(size):
            ours, theirs = context.Pipe()
            # Not daemonic: a tensor-parallel replica starts rank processes of its own. It ends when told to, or
            # once its pipe closes as this process ends.
            replica_config = replace(config, parallel=replace(config.parallel, data_parallel_size=1,
                                                              data_parallel_rank=index))
            process = context.Process(target=run_replica, args=(index, replica_config, theirs, self.threads),
                                      name=f"kvserve-dp-replica-{index}")
            with main_module_left_behind():
                process.start()
            theirs.close()
            self.replicas.append(Replica(index, process, ours))
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()   # (replica, kind, body), or None to wake the front
        self.failure: DataParallelFailure | None = None
        threading.Thread(target=self._read, daemon=True, name="kvserve-dp-reader").start()

    def send(self, replica: Replica, message: tuple) -> bool:
        """False if the replica's process has ended."""
        try:
            replica.conn.send(message)
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Tell each ready replica to stop, terminate those still loading; kill any not ended within STOP_WAIT_S."""
        for replica in self.replicas:
            replica.stopped = True
            if replica.info is None:
                replica.process.terminate()
            else:
                self.send(replica, ("stop",))
        deadline = time.monotonic() + STOP_WAIT_S
        for replica in self.replicas:
            replica.process.join(max(0.0, deadline - time.monotonic()))
            if replica.process.is_alive():
                replica.process.kill()
                replica.process.join()

    def _read(self) -> None:
        live = list(self.replicas)
        while live:
            ready = multiprocessing.connection.wait([r.conn for r in live] + [r.process.sentinel for r in live])
            for replica in [r for r in live if r.conn in ready or r.process.sentinel in ready]:
                try:
                    while replica.conn.poll():
                        self._take(replica, *replica.conn.recv())
                    if replica.process.sentinel not in ready:
                        continue
                except Exception:   # EOFError: its pipe closes a moment before its process can be reaped
                    pass
                live.remove(replica)
                replica.conn.close()
                replica.process.join(1)
                self._fail(replica, f"ended with exit code {replica.process.exitcode}" + (
                    "" if replica.info else " before it was ready; its output says why"))

    def _take(self, replica: Replica, kind: str, *body) -> None:
        if kind == "died":
            return self._fail(replica, f"stopped: {type(body[0]).__name__}: {body[0]}", body[0])
        if kind == "ready":
            replica.info = body[0]
        replica.stats = body[-1]
        self.inbox.put(None if kind in ("ready", "stats") else (replica, kind, body))

    def _fail(self, replica: Replica, how: str, cause: BaseException | None = None) -> None:
        if self.failure is None and not replica.stopped:
            self.failure = DataParallelFailure(f"data-parallel replica {replica.index} (process "
                                               f"{replica.process.pid}) {how}")
            self.failure.__cause__ = cause
            if replica.info is not None:   # one that fails the start is raised by the engine's constructor
                logger.error("%s", self.failure)
        self.inbox.put(None)


def portable(exc: BaseException) -> BaseException:
    """``exc``, or where it does not pickle a RuntimeError that says what it was."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def run_replica(index: int, config: EngineConfig, conn: multiprocessing.connection.Connection,
                threads: int | None) -> None:
    """A replica's process: build the engine, report ready, then serve the front's commands until told to stop
    or until the front's end of the pipe closes. Whatever stops the engine is reported, and ends the process
    (and with it any tensor-parallel ranks it started: they are daemonic)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole process group: the front decides
    init_logging(f" [replica {index}]")
    if threads is not None:   # the environment passes it on to any ranks the engine starts
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    engine = None
    try:
        signal.signal(signal.SIGTERM, terminated)
        engine = LLMEngine(config)
        engine.runner.wait_for_kv_cache()
        conn.send(("ready", {"config": engine.config, "vocab_size": engine.runner.vocab_size,
                             "dtype": engine.runner.dtype, "pooling": engine.inputs.pooling}, EngineStats.of(engine)))
        serve_front(engine, conn)
    except (EOFError, BrokenPipeError):   # the front has gone
        pass
    except BaseException as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # ending already: let the exit run its course
        if engine is not None:   # the front raises a start-up error itself
            logger.exception("the engine stopped")
        with suppress(OSError):
            conn.send(("died", portable(exc)))
        return
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    leave_parallel_group()   # a split engine's ranks stop with it


def terminated(*_) -> None:
    """SIGTERM (the front stops a replica still loading): end as on an error, so that its ranks end too."""
    raise SystemExit("terminated")


def serve_front(engine: LLMEngine, conn: multiprocessing.connection.Connection) -> None:
    """Take commands (add, abort, stop) as they come; step the engine while it has requests, sending each step's
    outputs (or the EngineStepError of a failed one) with the engine's stats."""
    while True:
        wait, changed = 0 if engine.has_unfinished_requests() else IDLE_POLL_S, False
        while conn.poll(wait):
            kind, *args = conn.recv()
            if kind == "stop":
                return
            (engine.add_request if kind == "add" else engine.abort_request)(*args)
            wait, changed = 0, True
        if engine.failure is not None:
            raise engine.failure
        if not engine.has_unfinished_requests():
            if changed:   # an abort emptied it: the front's gauges should say so
                conn.send(("stats", EngineStats.of(engine)))
            continue
        try:
            outputs = engine.step()
        except EngineStepError as exc:
            conn.send(("error", exc.request_ids, portable(exc.cause), EngineStats.of(engine)))
            continue
        conn.send(("outputs", outputs, EngineStats.of(engine)))
