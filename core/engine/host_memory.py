"""Host memory for a KV cache on the CPU: zeroed by the OS, and made resident in the background."""
from __future__ import annotations

import ctypes
import math
import os
import sys
import threading

import numpy as np
import torch

from kvserve.plugins.stages import stage

MADV_POPULATE_WRITE = 23   # Linux 5.14+: fault pages in writable without changing their contents
PAGE = 4096
# One madvise holds the process's mmap lock for its whole range, stalling every allocation the engine makes
# meanwhile (loading then waited 10 s for 4 GiB): populating a chunk at a time lets them through.
POPULATE_CHUNK = 64 * 2**20


def host_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, threading.Thread | None]:
    """Zeros from calloc, whose pages the OS supplies already zeroed when first touched: a multi-GiB KV cache
    then costs nothing at start-up (torch.zeros writes every byte, ~5 s for 4 GiB here). A background thread,
    returned with the tensor, then faults the pages in, so that the first requests do not pay for it (0.5 s of
    a first W1 run); it never writes, so it is safe while the engine already stores keys and values, and runs
    only on otherwise idle cores."""
    raw = np.zeros(math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    populating = None
    if sys.platform == "linux" and raw.nbytes > PAGE:
        populating = threading.Thread(target=_populate, args=(raw,), name="kvserve-populate-kv", daemon=True)
        populating.start()
    return torch.from_numpy(raw).view(dtype).view(shape), populating


def _populate(raw: np.ndarray) -> None:
    # Idle priority: faulting 4 GiB in takes 0.5 s, or 5-10 s when a VM's host must first back the memory, and
    # must not take a core from the engine's first steps meanwhile (they fault in what they touch themselves).
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    start = -(-raw.ctypes.data // PAGE) * PAGE   # madvise takes page-aligned ranges
    end = raw.ctypes.data + raw.nbytes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with stage(f"touching the KV cache's {raw.nbytes / 2**30:.1f} GiB, in the background"):
        for chunk in range(start, end - PAGE + 1, POPULATE_CHUNK):   # older kernels: EINVAL, harmless
            libc.madvise(chunk, min(POPULATE_CHUNK, (end - chunk) // PAGE * PAGE), MADV_POPULATE_WRITE)
