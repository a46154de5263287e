"""CPU graphs: a decode step's forward is recorded once per batch size as the operator calls it made, then replayed
by the C++ kernels' Replay without Python. Module calls, views and the Python around each kernel took ~3 ms of a
~14 ms one-sequence decode step here.

A recording holds the step's inputs (token ids, positions, the attention metadata's tensors) as slots and every
other tensor it met (weights, the KV cache, rotary tables) as a constant; Python values are baked in. That is
sound for forwards whose Python depends on a step only through tensor shapes, which a decode step's batch size
fixes; a backend declares it with ``replays_decode_steps``. A forward that reads tensor values on the host,
builds tensors from Python data or makes tensors whose shape depends on values is refused and stays eager."""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvserve.kernels_cpu import native
from kvserve.plugins.interfaces import AttentionMetadata, GraphRunner

logger = logging.getLogger("kvserve")


def refusal(func, args) -> str | None:
    """Why a call cannot be replayed: its result, or the shapes Python would read from it, depend on values."""
    if torch.Tag.data_dependent_output in func.tags:
        return "reads a tensor's value on the host"
    if func is torch.ops.aten.lift_fresh.default:
        return "builds a tensor from Python data"
    if torch.Tag.dynamic_output_shape in func.tags and not (   # indexing by integer tensors keeps its shape
            func is torch.ops.aten.index.Tensor and all(i is None or not i.is_floating_point() and i.dtype not in
                                                         (torch.bool, torch.uint8) for i in args[1])):
        return "has an output shape that depends on values"
    return None


class CaptureRefused(Exception):
    pass


def step_inputs(input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> list[torch.Tensor]:
    fields = (getattr(metadata, f.name) for f in dataclasses.fields(metadata))
    return [input_ids, positions, *(value for value in fields if isinstance(value, torch.Tensor))]


class Recorder(TorchDispatchMode):
    """Runs the forward as usual, noting each operator call with its arguments as slots or constants."""

    def __init__(self, inputs: list[torch.Tensor]):
        super().__init__()
        self.slot_of: dict[int, int] = {}
        self.seen: list[torch.Tensor] = []   # keeps every recorded tensor alive, so that ids stay unique
        self.calls: list[tuple[torch._ops.OpOverload, list[tuple], list[list[int]]]] = []
        for tensor in inputs:
            self._slot(tensor)

    def _slot(self, tensor: torch.Tensor) -> int:
        self.slot_of[id(tensor)] = len(self.seen)
        self.seen.append(tensor)
        return self.slot_of[id(tensor)]

    def _argument(self, value) -> tuple:
        if isinstance(value, torch.Tensor):
            return ("slot", self.slot_of[id(value)]) if id(value) in self.slot_of else ("constant", value)
        if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) and id(v) in self.slot_of
                                                     for v in value):
            if not all(v is None or isinstance(v, torch.Tensor) and id(v) in self.slot_of for v in value):
                raise CaptureRefused("a list of tensors mixing step values and constants")
            return ("slots", [-1 if v is None else self.slot_of[id(v)] for v in value])
        return ("constant", value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = refusal(func, args)
        if why:
            raise CaptureRefused(f"{func} {why}")
        out = func(*args, **kwargs)
        arguments = [self._argument(args[i]) if i < len(args) else
                     self._argument(kwargs[formal.name]) if formal.name in kwargs else ("default", None)
                     for i, formal in enumerate(func._schema.arguments)]
        results = () if not func._schema.returns else out if isinstance(out, tuple) else (out,)
        returns = [[self._slot(t) for t in r] if isinstance(r, list) else [self._slot(r)]
                   if isinstance(r, torch.Tensor) else [-1] for r in results]
        self.calls.append((func, arguments, returns))
        return out


def compile_replay(recorder: Recorder, output: torch.Tensor):
    """The recording as a native Replay whose run(inputs, [slot]) returns [output]."""
    if id(output) not in recorder.slot_of:
        raise CaptureRefused("the forward returned a tensor no recorded operator made")
    output_slot = recorder.slot_of[id(output)]
    last_use: dict[int, int] = {}
    for index, (_, arguments, _) in enumerate(recorder.calls):
        for kind, value in arguments:
            for slot in [value] if kind == "slot" else value if kind == "slots" else []:
                if slot >= 0:
                    last_use[slot] = index
    releases: dict[int, list[int]] = {}
    for slot, index in last_use.items():
        if slot != output_slot:
            releases.setdefault(index, []).append(slot)
    replay = native.load()[0].Replay(len(recorder.seen))
    for index, (func, arguments, returns) in enumerate(recorder.calls):
        replay.add(func._schema.name, func._schema.overload_name, arguments, returns, releases.get(index, []))
    return replay, output_slot


class CpuGraphRunner(GraphRunner):
    """Decode-only steps replay the recording of their batch size, recorded the first time that size runs."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.graphs: dict[int, tuple] = {}
        self.refused: set[int] = set()

    def can_run(self, metadata: AttentionMetadata, num_tokens: int) -> bool:
        return metadata.num_decodes == num_tokens and num_tokens not in self.refused

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        inputs = step_inputs(input_ids, positions, metadata)
        graph = self.graphs.get(len(input_ids))
        if graph is not None:
            replay, output_slot = graph
            return replay.run(inputs, [output_slot])[0]
        recorder = Recorder(inputs)
        try:
            with recorder:
                hidden = self.model(input_ids, positions, metadata)
        except CaptureRefused as refusal:
            self._refuse(len(input_ids), refusal)
            return self.model(input_ids, positions, metadata)   # stores the same keys and values again
        try:
            self.graphs[len(input_ids)] = compile_replay(recorder, hidden)
        except (CaptureRefused, RuntimeError, TypeError) as refusal:   # e.g. a constant the dispatcher cannot take
            self._refuse(len(input_ids), refusal)
        return hidden

    def _refuse(self, num_tokens: int, why: Exception) -> None:
        logger.warning("CPU graphs: decode steps of %d sequences stay eager: %s", num_tokens, why)
        self.refused.add(num_tokens)
