"""Data parallelism: ``data_parallel_size`` whole engines (replicas), each in a process of its own and each
possibly tensor-parallel itself, behind a front that offers the offline API and the server what an LLMEngine
offers them. The front validates every request, routes it to a replica (router below) and gathers the
replicas' step outputs from their pipes."""
from __future__ import annotations

import multiprocessing.util
import queue
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from kvserve.core.config import EngineConfig
from kvserve.core.engine.block_manager import chain_hash
from kvserve.core.engine.input_processor import InputProcessor
from kvserve.core.engine.llm_engine import EngineStepError, LLMEngine
from kvserve.core.engine.replicas import DataParallelFailure, Replica, Replicas
from kvserve.core.engine.stats import EngineStats
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.log import logger
from kvserve.core.outputs import RequestOutput
from kvserve.core.sampling_params import BeamSearchParams, SamplingParams
from kvserve.core.structured_outputs.manager import StructuredOutputManager

STEP_WAIT_S = 0.01        # how long step() waits for the replicas' outputs: short, as new requests wait on it
AFFINITY_BLOCKS = 8       # how many of a prompt's first blocks route it to where they were sent before
AFFINITY_ENTRIES = 4096   # prefixes remembered, the least recently routed forgotten first


def make_engine(config: EngineConfig) -> LLMEngine | DataParallelEngine:
    """The engine for ``config``: one LLMEngine, or a front over data_parallel_size of them."""
    return DataParallelEngine(config) if config.parallel.data_parallel_size > 1 else LLMEngine(config)


class Router:
    """Sends each request to the replica with the fewest unfinished requests (of those, the one sent fewest), unless
    the replica that last took the longest of its prompt's first AFFINITY_BLOCKS blocks is loaded within a slack
    of that one (least + max(2, 25%)): its prefix cache may hold those blocks."""

    def __init__(self, size: int, block_size: int):
        self.block_size = block_size
        self.loads = [0] * size    # unfinished requests each replica holds
        self.served = [0] * size   # requests each replica has been sent
        self.owners: OrderedDict[int, int] = OrderedDict()   # hash of a prompt prefix -> replica that last took it

    def route(self, prompt_token_ids: list[int]) -> int:
        least = min(range(len(self.loads)), key=lambda i: (self.loads[i], self.served[i]))
        prefixes = self.prefix_hashes(prompt_token_ids)
        owner = next((self.owners[h] for h in reversed(prefixes) if h in self.owners), None)
        slack = max(2, self.loads[least] // 4)
        chosen = owner if owner is not None and self.loads[owner] <= self.loads[least] + slack else least
        for h in prefixes:
            self.owners[h] = chosen
            self.owners.move_to_end(h)
        while len(self.owners) > AFFINITY_ENTRIES:
            self.owners.popitem(last=False)
        self.loads[chosen] += 1
        self.served[chosen] += 1
        return chosen

    def finished(self, replica: int) -> None:
        self.loads[replica] -= 1

    def prefix_hashes(self, ids: list[int]) -> list[int]:
        """A hash for each full block among the first AFFINITY_BLOCKS, of the prompt up to that block's end."""
        hashes, chain, size = [], None, self.block_size
        for start in range(0, min(len(ids) // size, AFFINITY_BLOCKS) * size, size):
            chain = chain_hash(chain, tuple(ids[start:start + size]))
            hashes.append(chain)
        return hashes


@dataclass
class ReplicaRunner:
    """What callers read of an engine's model runner (``engine.runner``), as replica 0 reported it (every
    replica holds the same model)."""

    vocab_size: int
    dtype: torch.dtype

    def wait_for_kv_cache(self) -> None:
        """Nothing to wait for: a replica reports ready once its KV cache is resident."""


class DataParallelEngine:
    """LLMEngine's interface (validate, add_request, abort_request, has_unfinished_requests, step, failure and
    stats) over data_parallel_size replicas, each an LLMEngine in a process of its own. Every replica's engine
    takes the same seed (config.model.seed): greedy tokens do not depend on the replica a request runs on, and a
    seeded request samples from its own generator wherever it runs."""

    def __init__(self, config: EngineConfig):
        self.config = config
        checkpoint = Checkpoint.open(config.model)   # a wrong path fails here, before any process starts
        self.replicas = Replicas(config)
        self._finalizer = multiprocessing.util.Finalize(self, self.replicas.stop, exitpriority=10)
        self.replica_of: dict[str, int] = {}   # unfinished request id -> the replica running it
        self._held: list[RequestOutput] = []   # outputs taken in, for the next step() to return
        self._errors: deque[EngineStepError] = deque()
        try:
            self.tokenizer = checkpoint.tokenizer(config.model.tokenizer)
            while self.failure is None and any(r.info is None for r in self.replicas.replicas):
                self.replicas.inbox.get()
        except BaseException:
            self.shutdown()
            raise
        if self.failure is not None:
            self.shutdown()
            cause = self.failure.__cause__
            raise cause if isinstance(cause, (ValueError, TypeError)) else self.failure
        info = self.replicas.replicas[0].info
        # The replicas' engines settled what depends on the model and the platform (max_model_len, dtype, ...).
        vars(config).update({k: v for k, v in vars(info["config"]).items() if k != "parallel"})
        self.max_model_len = config.model.max_model_len
        self.runner = ReplicaRunner(info["vocab_size"], info["dtype"])
        # The front compiles each constraint to refuse a bad one before any replica is sent the request.
        self.grammars = StructuredOutputManager(config.structured_outputs, self.tokenizer, self.runner.vocab_size,
                                                checkpoint.eos_token_ids or [self.tokenizer.eos_token_id])
        self.inputs = InputProcessor(self.tokenizer, self.runner.vocab_size, self.max_model_len,
                                     config.scheduler.max_num_seqs, self.grammars, config.model.chat_template,
                                     checkpoint.sampling_defaults(config.model.generation_config), info["pooling"])
        self.router = Router(len(self.replicas.replicas), config.cache.block_size)
        tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
        split = " of ".join([f"{pp} pipeline stages"] * (pp > 1) + [f"{tp} tensor-parallel ranks" + " each" * (pp > 1)]
                            * (tp > 1))
        threads = self.replicas.threads
        logger.info("data parallelism over %d replicas: %s%s%s", len(self.replicas.replicas),
                    ", ".join(f"replica {r.index} in process {r.process.pid}" for r in self.replicas.replicas),
                    f"; each splits its model over {split}" if split else "",
                    "" if threads is None else f"; {threads} CPU thread{'s' * (threads > 1)} a process")

    def validate(self, prompt: str | list[int], params: SamplingParams | BeamSearchParams) -> list[int]:
        """Check a request without starting it; returns its prompt token ids."""
        return self.inputs.validate(prompt, params)

    def check_lora(self, lora_request) -> None:
        raise ValueError("lora_request needs an engine started with enable_lora=True, which runs one replica "
                         "(data_parallel_size=1)")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | BeamSearchParams,
                    prompt_token_ids: list[int] | None = None, lora_request=None) -> None:
        """Validate a request here (``prompt_token_ids`` skips that) and send it to the replica the router
        picks."""
        if lora_request is not None:
            self.check_lora(lora_request)
        if self.failure is not None:
            raise self.failure
        if request_id in self.replica_of:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = prompt_token_ids if prompt_token_ids is not None else self.validate(prompt, params)
        index = self.router.route(ids)
        self.replica_of[request_id] = index
        self.replicas.send(self.replicas.replicas[index], ("add", request_id, prompt, params, ids))

    def abort_request(self, request_id: str) -> None:
        index = self.replica_of.get(request_id)
        if index is not None:
            self._finish(request_id)
            self._held = [output for output in self._held if output.request_id != request_id]
            self.replicas.send(self.replicas.replicas[index], ("abort", request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self.replica_of or self._held or self._errors)

    @property
    def failure(self) -> DataParallelFailure | None:
        """Why no step can run any more, if none can: a replica's process ended."""
        return self.replicas.failure

    def stats(self) -> EngineStats:
        """The replicas' queues and counters, summed, as of each one's last report."""
        return sum((replica.stats for replica in self.replicas.replicas), EngineStats())

    def step(self) -> list[RequestOutput]:
        """The outputs of the steps the replicas ran since the last call, waiting up to STEP_WAIT_S for some.

        EngineStepError names the requests of a replica's step that failed (the replica goes on); once a
        replica's process has ended, DataParallelFailure says which, and no step can run any more.
        """
        try:
            item = self.replicas.inbox.get(timeout=STEP_WAIT_S) if not self._held and not self._errors else None
            while True:
                if item is not None:
                    self._handle(*item)
                item = self.replicas.inbox.get_nowait()
        except queue.Empty:
            pass
        if self._errors:
            raise self._errors.popleft()
        if self.failure is not None:
            raise self.failure
        outputs, self._held = self._held, []
        return outputs

    def shutdown(self) -> None:
        """Stop every replica (done at exit too, and once the engine is garbage)."""
        self._finalizer()

    def _finish(self, request_id: str) -> None:
        self.router.finished(self.replica_of.pop(request_id))

    def _handle(self, replica: Replica, kind: str, body: tuple) -> None:
        if kind == "outputs":
            for output in body[0]:
                if self.replica_of.get(output.request_id) == replica.index:   # else aborted meanwhile
                    self._held.append(output)
                    if output.finished:
                        self._finish(output.request_id)
        elif kind == "error":
            request_ids, cause, _ = body
            failed = [i for i in request_ids if self.replica_of.get(i) == replica.index]
            for request_id in failed:
                self._finish(request_id)
            if failed:
                self._errors.append(EngineStepError(failed, cause))
