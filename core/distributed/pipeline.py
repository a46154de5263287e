"""What passes between pipeline stages: each model runner call, and with a step the hidden states it reached,
from a rank to the rank of the next stage at its place in the tensor-parallel group; and the last stage's step
output back to rank 0. Sends do not wait for the receiver, so that a stage goes on to the next micro-batch while
the stage after it runs this one."""
from __future__ import annotations

import pickle
from dataclasses import fields, replace

import torch
import torch.distributed as dist

from kvserve.core.engine.model_runner import StepOutput
from kvserve.core.engine.sequence import Sequence


class StageLink:
    """Point-to-point messages: a picklable object and the tensors it carries, in the order they were sent."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sending: list[tuple[dist.Work, torch.Tensor]] = []   # each kept alive until it has gone

    def send(self, dst: int, message: object, tensors: tuple[torch.Tensor, ...] = ()) -> None:
        tensors = tuple(t.contiguous() for t in tensors)
        data = pickle.dumps((message, [(t.shape, t.dtype) for t in tensors]))
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        self.sending = [(work, t) for work, t in self.sending if not work.is_completed()]
        self.sending += [(dist.isend(t, dst), t) for t in (size, payload, *tensors)]

    def recv(self, src: int) -> tuple[object, tuple[torch.Tensor, ...]]:
        size = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.recv(size, src)
        payload = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        dist.recv(payload, src)
        message, specs = pickle.loads(payload.cpu().numpy().tobytes())
        tensors = tuple(torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in specs)
        for tensor in tensors:
            dist.recv(tensor, src)
        return message, tensors

    def flush(self) -> None:
        for work, _ in self.sending:
            work.wait()
        self.sending = []


def rekeyed(out: StepOutput, key) -> StepOutput:
    """``out`` with each sequence replaced by ``key(sequence)``: its id to send it, the sequence to use it."""
    by_seq = {f.name: {key(seq): value for seq, value in getattr(out, f.name).items()}
              for f in fields(StepOutput) if isinstance(getattr(out, f.name), dict)}
    return replace(out, sampled=[(key(seq), token) for seq, token in out.sampled], **by_seq)


def seq_id(seq: Sequence) -> int:
    return seq.seq_id
