"""The C++ kernels of csrc/, compiled on first use with torch's cpp_extension (cached under
~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR) for the CPU this runs on."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

from kvserve.plugins.stages import stage

CSRC = Path(__file__).with_name("csrc")
SOURCES = [str(CSRC / name) for name in
           ("replay.cpp", "paged_attention.cpp", "linear_bf16.cpp", "linear_int8.cpp", "linear_int8_avx2.cpp", "linear_grouped.cpp",
            "linear_grouped_avx2.cpp", "linear_fp8.cpp", "fused_ops.cpp")]
NAME = "kvserve_cpu_ops"
DISABLE_ENV = "KVSERVE_CPU_NATIVE"   # "0" keeps the CPU platform on its torch implementations
# Without errno and trapping semantics, loops calling floorf (in fast_exp) vectorize. torch rebuilds a cached
# extension when its sources or flags change, not its headers: the headers' digest joins the flags.
HEADERS_DIGEST = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(CSRC.glob("*.h")))).hexdigest()[:16]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
         f"-DKVSERVE_HEADERS={HEADERS_DIGEST}"]

logger = logging.getLogger("kvserve")


@functools.cache
def load() -> tuple[ModuleType | None, str]:
    """(the compiled module, "") or (None, why it is not available)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None, f"disabled by {DISABLE_ENV}=0"
    try:
        from torch.utils.cpp_extension import load as build

        with stage("building the CPU kernels for this CPU (once after an install; later starts load them)"):
            module = build(NAME, SOURCES, extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:   # no compiler, or a failed build: the torch implementations still work
        last_line = (str(exc).strip().splitlines() or [""])[-1]
        reason = f"{type(exc).__name__}: {last_line}"
        logger.warning("CPU native kernels unavailable, using torch implementations (%s)", reason)
        return None, reason
    return module, ""


@functools.cache
def op(name: str) -> torch._ops.OpOverload:
    """A kernel as the operator the extension registers (torch.ops.kvserve_cpu_ops.<name>), which CPU graphs
    record and replay like torch's own."""
    load()
    return getattr(getattr(torch.ops, NAME), name).default


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return op("rms_norm")(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    normed, summed = op("rms_norm")(x, residual, weight, eps)
    return normed, summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return op("silu_and_mul")(x)


def rotary_embedding(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rotate = op("rotary_embedding")
    return rotate(query, cos, sin), rotate(key, cos, sin)


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """Like kvserve.plugins.torch_attention.store_kv, but keys go into their block transposed, [head, block_size]."""
    op("store_kv")(key, value, kv_cache, slot_mapping, *kv_scales)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    sliding_window: int | None, kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Every sequence's new queries, [tokens, heads, head], over its cache as store_kv wrote it: causal, within
    the window; an FP8 cache's keys and values times their ``kv_scales``."""
    return op("paged_attention")(query, kv_cache, block_tables, seq_lens, query_start_loc, scale * kv_scales[0],
                                 sliding_window or 0, kv_scales[1])


def argmax(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.dtype != torch.float32:
        return x.argmax(dim=-1)
    return op("argmax")(x)


FUSED_OPS = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "silu_and_mul": silu_and_mul,
             "rotary_embedding": rotary_embedding, "argmax": argmax}
