"""Attention backend choice shared by platforms: a priority list, with a user override."""
from __future__ import annotations

import os

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
        reasons[candidate.name] = candidate.unsupported_reasons(spec)
        if not reasons[candidate.name]:
            return candidate
    detail = "; ".join(f"{name}: {', '.join(why)}" for name, why in reasons.items())
    raise ValueError(f"no attention backend supports this model ({detail})")
