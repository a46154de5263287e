"""The platform's communicator: all_reduce, all_gather, broadcast and barrier between two ranks, each a process
bound to a device of its own, over the default group and a subgroup; and a single rank's communicator."""
from __future__ import annotations

import multiprocessing
import queue
import socket

import pytest
import torch

from kvserve.conformance.collectives import WORLD_SIZE, run_rank

TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_single_rank_needs_no_peers(platform):
    communicator = platform.communicator(0, 1)
    x = torch.randn(4, 3, device=platform.device)
    for result in (communicator.all_reduce(x.clone()), communicator.all_gather(x), communicator.broadcast(x.clone())):
        torch.testing.assert_close(result, x)
    communicator.barrier()


def test_collectives_between_two_ranks(platform_name):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    address = f"tcp://127.0.0.1:{free_port()}"
    ranks = [context.Process(target=run_rank, args=(rank, platform_name, address, results), daemon=True)
             for rank in range(WORLD_SIZE)]
    for process in ranks:
        process.start()
    reports = []
    try:
        while len(reports) < WORLD_SIZE:
            reports.append(results.get(timeout=TIMEOUT_S))
            if reports[-1][1] != "ok":
                break   # the other rank may wait for this one forever
    except queue.Empty:
        pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s; reports so far: {reports}")
    finally:
        for process in ranks:
            process.join(timeout=30 if all(r[1] == "ok" for r in reports) else 0)
            if process.is_alive():
                process.kill()
    failed = [detail for _, status, detail in reports if status == "fail"]
    assert not failed, "\n".join(failed)
    skipped = [detail for _, status, detail in reports if status == "skip"]
    if skipped:
        pytest.skip(skipped[0])
