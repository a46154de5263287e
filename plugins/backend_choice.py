"""Attention backend choice shared by platforms: a priority list, with a user override."""
from __future__ import annotations

import os

import torch

from kvserve.plugins.interfaces import AttentionBackend, AttentionSpec

BACKEND_ENV = "KVSERVE_ATTENTION_BACKEND"


def choose_backend(candidates: list[type[AttentionBackend]], spec: AttentionSpec) -> type[AttentionBackend]:
    """The first candidate that supports ``spec``, or the one named by KVSERVE_ATTENTION_BACKEND.

    Raises ValueError listing every candidate with its reasons when none (or not the requested one) fits.
    """
    requested = os.environ.get(BACKEND_ENV) or None
    if requested is not None and requested not in [c.name for c in candidates]:
        raise ValueError(f"{BACKEND_ENV}={requested!r} is not a backend of this platform; "
                         f"allowed: {', '.join(c.name for c in candidates)}")
    reasons = {}
    for candidate in candidates:
        if requested is not None and candidate.name != requested:
            continue
        reasons[candidate.name] = (candidate.unsupported_reasons(spec) + cache_reasons(candidate, spec)
                                   + soft_cap_reasons(candidate, spec))
        if not reasons[candidate.name]:
            return candidate
    detail = "; ".join(f"{name}: {', '.join(why)}" for name, why in reasons.items())
    raise ValueError(f"no attention backend supports this model ({detail})")


def cache_reasons(backend: type[AttentionBackend], spec: AttentionSpec) -> list[str]:
    """Why ``backend`` cannot keep ``spec``'s KV cache: an FP8 type it does not name in ``kv_cache_dtypes``."""
    if spec.kv_cache_dtype is None or spec.kv_cache_dtype in backend.kv_cache_dtypes:
        return []
    return [f"it keeps no KV cache in {str(spec.kv_cache_dtype).removeprefix('torch.')}"]


def soft_cap_reasons(backend: type[AttentionBackend], spec: AttentionSpec) -> list[str]:
    """Why ``backend`` cannot run ``spec``'s soft-capped scores: it does not say it caps them."""
    if spec.logits_soft_cap is None or backend.soft_caps_logits:
        return []
    return [f"it does not soft-cap attention scores (logits_soft_cap={spec.logits_soft_cap})"]


def common_reasons(spec: AttentionSpec, dtypes: tuple[torch.dtype, ...]) -> list[str]:
    """What most backends check: that they compute in ``spec``'s dtype, and that the query heads share the kv
    heads evenly."""
    reasons = []
    if spec.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        reasons.append(f"dtype {spec.dtype} is not one of {names}")
    if spec.num_heads % spec.num_kv_heads:
        reasons.append(f"{spec.num_heads} query heads are not a multiple of {spec.num_kv_heads} kv heads")
    return reasons
