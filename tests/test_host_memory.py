"""The CPU KV cache's memory: zeros at once, resident soon after, and writes made meanwhile kept."""
from __future__ import annotations

import sys
import time

import pytest
import torch

from kvserve.core.engine.host_memory import host_zeros


def resident_bytes() -> int:
    rss_kb = next(line for line in open("/proc/self/smaps_rollup") if line.startswith("Rss:")).split()[1]
    return int(rss_kb) * 1024


@pytest.mark.skipif(sys.platform != "linux", reason="pages are populated on Linux only")
def test_cache_pages_become_resident_without_losing_writes():
    size = 256 << 20
    before = resident_bytes()
    cache = host_zeros((size // 2,), torch.bfloat16)
    cache[::1 << 24] = 1.5                   # a few writes while the background thread populates the pages
    deadline = time.monotonic() + 30
    while resident_bytes() - before < size * 0.9 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert resident_bytes() - before >= size * 0.9
    assert (cache[::1 << 24] == 1.5).all() and int(torch.count_nonzero(cache)) == len(cache[::1 << 24])
