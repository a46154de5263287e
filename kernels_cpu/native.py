"""The C++ kernels of csrc/, compiled on first use with torch's cpp_extension (cached under
~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR) for the CPU this runs on. They come in parts, each its own
extension, so that a first start builds only what its model runs: the core (attention, per-token ops, CPU graphs'
replay) for every model, a linear part with the first weight that takes it."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

from kvserve.plugins.stages import stage

CSRC = Path(__file__).with_name("csrc")
# part: its sources; replay.cpp, the slowest to compile, first so that ninja starts it first
PARTS = {"core": ("replay.cpp", "paged_attention.cpp", "fused_ops.cpp"),
         "bf16": ("linear_bf16.cpp",),
         "int8": ("linear_int8.cpp",),
         "grouped": ("linear_grouped.cpp",),
         "fp8": ("linear_fp8.cpp",)}
DISABLE_ENV = "KVSERVE_CPU_NATIVE"   # "0" keeps the CPU platform on its torch implementations
# Without errno and trapping semantics, loops calling floorf (in fast_exp) vectorize. torch rebuilds a cached
# extension when its sources or flags change, not its headers: the headers' digest joins the flags.
HEADERS_DIGEST = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(CSRC.glob("*.h")))).hexdigest()[:16]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
         f"-DKVSERVE_HEADERS={HEADERS_DIGEST}"]

logger = logging.getLogger("kvserve")


def extension_name(part: str) -> str:
    """The part's extension, and the namespace of its operators: torch.ops.<extension_name(part)>.<op>."""
    return f"kvserve_cpu_{part}"


_BUILDING = {part: threading.Lock() for part in PARTS}   # one build per part, whichever thread asks first


def load(part: str = "core") -> tuple[ModuleType | torch._ops._OpNamespace | None, str]:
    """(the part, "") or (None, why it is not available). The core is a Python module (Replay, and its operators
    in torch.ops); a linear part is its operators' namespace, weight packing and feature checks included."""
    with _BUILDING[part]:
        return _load(part)


def build_in_background(*parts: str) -> None:
    """Start building ``parts`` on threads, so that a first start builds them beside its other work and each
    other; load() then waits for them. The threads are not daemons: a process that ends meanwhile waits for its
    builds rather than leave torch's build lock behind, which would hold up every later start."""
    for part in parts:
        threading.Thread(target=load, args=(part,), name=f"kvserve-build-{part}").start()


@functools.cache
def _load(part: str) -> tuple[ModuleType | torch._ops._OpNamespace | None, str]:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None, f"disabled by {DISABLE_ENV}=0"
    try:
        from torch.utils.cpp_extension import load as build

        with stage(f"building the CPU kernels' {part} part for this CPU (once after an install; later starts "
                   "load it)"):
            module = build(extension_name(part), [str(CSRC / name) for name in PARTS[part]], extra_cflags=FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=part == "core", verbose=False)
    except Exception as exc:   # no compiler, or a failed build: the torch implementations still work
        last_line = (str(exc).strip().splitlines() or [""])[-1]
        reason = f"{type(exc).__name__}: {last_line}"
        logger.warning("CPU native kernels (%s) unavailable, using torch implementations (%s)", part, reason)
        return None, reason
    return (module if part == "core" else getattr(torch.ops, extension_name(part))), ""


def supported(part: str, *args) -> bool:
    """Whether a linear part built and its kernel runs on this CPU (``args``: the grouped part's input dtype)."""
    ops = load(part)[0]
    return ops is not None and getattr(ops, f"linear_{part}_supported")(*args)


def isa(part: str) -> str:
    """What the part's kernels run on this CPU ("AVX512-BF16", "AMX-BF16 from 16 rows, AVX512-BF16 below", ...):
    the compiled code's own answer; "" where the part did not build or its kernels do not run here."""
    ops = load(part)[0]
    if ops is None:
        return ""
    return op("paged_attention_isa")() if part == "core" else getattr(ops, f"linear_{part}_isa")()


@functools.cache
def announce(what: str, kernel: str) -> None:
    """Log which kernel runs ``what``, once a process: the first load that uses it names it."""
    logger.info("%s: %s", what, kernel)


@functools.cache
def op(name: str) -> torch._ops.OpOverload:
    """A core kernel as the operator the extension registers, which CPU graphs record and replay like torch's
    own."""
    load()
    return getattr(getattr(torch.ops, extension_name("core")), name).default


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
                    sliding_window: int | None, kv_scales: tuple[float, float] = (1.0, 1.0),
                    soft_cap: float | None = None) -> torch.Tensor:
    """Every sequence's new queries, [tokens, heads, head], over its cache as store_kv wrote it: causal, within
    the window; an FP8 cache's keys and values times their ``kv_scales``."""
    return op("paged_attention")(query, kv_cache, block_tables, seq_lens, query_start_loc, scale * kv_scales[0],
                                 sliding_window or 0, kv_scales[1], soft_cap or 0.0)


def argmax(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.dtype != torch.float32:
        return x.argmax(dim=-1)
    return op("argmax")(x)


FUSED_OPS = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "silu_and_mul": silu_and_mul,
             "rotary_embedding": rotary_embedding, "argmax": argmax}
