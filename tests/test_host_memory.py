"""The CPU KV cache's memory: zeros at once, resident soon after, and writes made meanwhile kept."""
from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from kvserve.core.engine.host_memory import PAGE, host_zeros


def resident_fraction(tensor: torch.Tensor) -> float:
    """The share of ``tensor``'s memory pages that are in RAM (mincore), whatever the rest of the process does."""
    start = tensor.data_ptr() // PAGE * PAGE
    pages = -(-(tensor.data_ptr() + tensor.nbytes - start) // PAGE)
    flags = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * PAGE), flags) == 0, ctypes.get_errno()
    return sum(flag & 1 for flag in bytes(flags)) / pages


@pytest.mark.skipif(sys.platform != "linux", reason="pages are populated on Linux only")
def test_cache_pages_become_resident_without_losing_writes():
    cache, populating = host_zeros((128 << 20,), torch.bfloat16)   # 256 MiB
    cache[::1 << 24] = 1.5                                          # a few writes while the thread populates
    populating.join(timeout=30)
    assert not populating.is_alive()
    assert resident_fraction(cache) >= 0.99
    assert (cache[::1 << 24] == 1.5).all() and int(torch.count_nonzero(cache)) == len(cache[::1 << 24])
